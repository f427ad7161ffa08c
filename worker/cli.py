"""The ``flexllm`` command: serve, worker, generate, submit, jobs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

log = logging.getLogger("flexllm")

EMBEDDED_URL_FILE = "embedded-redis-url"  # under the cache dir: how submit/jobs find `flexllm serve`'s Redis


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (``--log-json``), for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# -- arguments --------------------------------------------------------------------------------------
def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m", help="bundled name, HF folder, .gguf, file:// or pvc:// URI")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--max-tokens-per-batch", type=int, default=256)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-fraction", type=float, default=0.5)
    g.add_argument("--max-loras", type=int, default=4)
    g.add_argument("--max-lora-rank", type=int, default=16)


def _queue_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("queue")
    g.add_argument("--redis-url", default=None,
                   help="redis:// or rediss:// (env FLEXLLM_REDIS_URL; password in the URL or env REDIS_PASSWORD); "
                        "default: an embedded Redis started and stopped with this command")
    g.add_argument("--service", default=os.environ.get("FLEXLLM_SERVICE", "default"),
                   help="InferenceService name")
    g.add_argument("--adapter-dir", default=os.environ.get("FLEXLLM_ADAPTER_DIR"),
                   help="adapter store root (default: <cache>/adapters)")
    g.add_argument("--reclaim-idle-ms", type=int, default=30_000,
                   help="take over requests a silent engine holds for this long")


def _coserve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("co-serving")
    g.add_argument("--ttft-ms", type=float, default=5000.0, help="time-to-first-token SLO")
    g.add_argument("--tpot-ms", type=float, default=75.0, help="time-per-output-token SLO")
    g.add_argument("--policy", default="coserve", choices=["coserve", "temporal", "inference-only", "finetune-only"])
    g.add_argument("--max-finetune-tokens", type=int, default=256, help="fine-tuning tokens per iteration, at most")
    g.add_argument("--data-dir", default=os.environ.get("FLEXLLM_DATA_DIR"),
                   help="FinetuneJob datasets must live under this folder (default: anywhere)")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=URI",
                   help="a PEFT adapter folder (file:// or pvc:// URI, or path) served from the start; repeatable")


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-json", action="store_true", help="JSON log lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible API + engine loop")
    _engine_args(serve)
    _queue_args(serve)
    _coserve_args(serve)
    _log_args(serve)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the base model's name in requests")
    serve.add_argument("--api-key", default=os.environ.get("FLEXLLM_API_KEY"), help="env FLEXLLM_API_KEY")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20)
    serve.add_argument("--max-prompt-tokens", type=int, default=32768)
    serve.add_argument("--max-queued-requests", type=int, default=1024)
    serve.add_argument("--request-timeout-s", type=float, default=600.0)

    worker = sub.add_parser("worker", help="the engine loop alone (consumes the service's request stream)")
    _engine_args(worker)
    _queue_args(worker)
    _coserve_args(worker)
    _log_args(worker)
    worker.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port")

    generate = sub.add_parser("generate", help="generate offline, no server")
    _engine_args(generate)
    _log_args(generate)
    generate.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--lora", default=None, metavar="NAME=PATH", help="a PEFT adapter folder to apply")

    submit = sub.add_parser("submit", help="queue a FinetuneJob (the custom resource's YAML)")
    submit.add_argument("-f", "--file", required=True, type=Path)
    submit.add_argument("--redis-url", default=None)
    submit.add_argument("--namespace", default="default")

    demo = sub.add_parser("demo", help="embedded Redis + bundled model: a FinetuneJob co-served with inference")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("-f", "--file", type=Path, default=Path("examples/finetunejob.yaml"), help="the FinetuneJob")
    demo.add_argument("--rate", type=float, default=1.0, help="inference requests per second (Poisson)")
    demo.add_argument("--ttft-ms", type=float, default=5000.0)
    demo.add_argument("--tpot-ms", type=float, default=300.0, help="default sized for a CPU")
    demo.add_argument("--max-tokens-per-batch", type=int, default=256)
    demo.add_argument("--output", type=Path, default=Path("demo-output"), help="plot, summary, adapters")
    _log_args(demo)
    demo.set_defaults(log_level="warning")

    jobs = sub.add_parser("jobs", help="fine-tuning jobs and their progress")
    jobs.add_argument("--redis-url", default=None)
    jobs.add_argument("--service", default=None, help="default: all services")
    jobs.add_argument("--watch", action="store_true", help="progress bars until every job has ended")
    return parser


# -- helpers -------------------------------------------------------------------------------------
def _engine_config(args: argparse.Namespace):
    from flexllm.worker.engine.config import EngineConfig

    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                        max_tokens_per_batch=args.max_tokens_per_batch, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, kv_cache_fraction=args.kv_cache_fraction,
                        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)


def _adapter_dir(args: argparse.Namespace) -> str:
    from flexllm.worker.engine.loader import cache_dir

    return args.adapter_dir or str(cache_dir() / "adapters")


def _worker_options(args: argparse.Namespace, url: str):
    from flexllm.worker.coserve.policy import SLO
    from flexllm.worker.engine.loader import resolve_model
    from flexllm.worker.serving import WorkerOptions

    pinned = {}
    for item in args.adapter:
        name, _, uri = item.partition("=")
        if not uri:
            sys.exit("--adapter takes NAME=URI")
        pinned[name] = str(resolve_model(uri))
    return WorkerOptions(url, args.service, _replica(), _adapter_dir(args), args.reclaim_idle_ms,
                         SLO(args.ttft_ms / 1000, args.tpot_ms / 1000), args.policy, args.max_finetune_tokens,
                         args.data_dir, pinned)


def _replica() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


def _parse_job_spec(spec: dict):
    from flexllm.worker.finetune.spec import FinetuneJobSpec

    return FinetuneJobSpec.model_validate(spec)


class _RedisForCommand:
    """The command's Redis URL; without one, an embedded server for the command's lifetime."""

    def __init__(self, flag: str | None):
        from flexllm.worker.queue.connection import redis_url

        self.url, self.embedded = redis_url(flag), None

    def __enter__(self) -> str:
        if self.url is None:
            from flexllm.worker.engine.loader import cache_dir
            from flexllm.worker.redis_server import EmbeddedRedis

            self.embedded = EmbeddedRedis()
            self.url = self.embedded.start()
            self.url_file = cache_dir() / EMBEDDED_URL_FILE
            self.url_file.parent.mkdir(parents=True, exist_ok=True)
            self.url_file.write_text(self.url)
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self.embedded is not None:
            self.url_file.unlink(missing_ok=True)
            self.embedded.stop()


def _client_url(flag: str | None) -> str:
    """For submit/jobs: the flag, env, or the embedded Redis of a running ``flexllm serve``."""
    from flexllm.worker.engine.loader import cache_dir
    from flexllm.worker.queue.connection import redis_url

    url = redis_url(flag)
    found = cache_dir() / EMBEDDED_URL_FILE
    if url is None and found.exists():
        url = found.read_text().strip()
    if url is None:
        sys.exit("no Redis: pass --redis-url (or set FLEXLLM_REDIS_URL), or start `flexllm serve` first")
    return url


def _stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


# -- commands ------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from flexllm.worker.api.app import ApiConfig, create_app
    from flexllm.worker.metrics import Metrics
    from flexllm.worker.serving import EngineWorker

    with _RedisForCommand(args.redis_url) as url:
        options = _worker_options(args, url)
        metrics = Metrics(options.slo)
        config = ApiConfig(redis_url=url, service=args.service, model_name=args.served_model_name or args.model,
                           max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                           max_queued_requests=args.max_queued_requests, request_timeout_s=args.request_timeout_s,
                           api_key=args.api_key)
        app = create_app(config, metrics)
        worker = EngineWorker(_engine_config(args), options, metrics, _parse_job_spec,
                              on_ready=lambda e: app.state.api.attach_model(e.tokenizer, e.max_model_len),
                              on_failure=app.state.api.engine_failed)
        stop = threading.Event()
        engine_thread = worker.start_thread(stop)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                                               timeout_graceful_shutdown=30))
        try:
            server.run()
        finally:
            stop.set()
            engine_thread.join(timeout=60)
    return 0 if worker.failed is None else 1


def cmd_worker(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from flexllm.worker.metrics import Metrics
    from flexllm.worker.serving import EngineWorker

    with _RedisForCommand(args.redis_url) as url:
        options = _worker_options(args, url)
        metrics = Metrics(options.slo)
        if args.metrics_port is not None:
            start_http_server(args.metrics_port, registry=metrics.registry)
        stop = threading.Event()
        _stop_on_signals(stop)
        EngineWorker(_engine_config(args), options, metrics, _parse_job_spec).run(stop)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from flexllm.worker.engine.llm_engine import LLMEngine
    from flexllm.worker.engine.sampling import SamplingParams

    engine = LLMEngine(_engine_config(args))
    lora = None
    if args.lora:
        lora, _, path = args.lora.partition("=")
        if not path:
            sys.exit("--lora takes NAME=PATH")
        engine.add_lora(lora, path)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    for out in engine.generate(args.prompt, params, lora=lora, use_tqdm=True):
        print(out.text)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import yaml

    from flexllm.worker.queue.connection import connect, with_backoff
    from flexllm.worker.queue.jobs import JobQueue, JobSubmission

    manifest = yaml.safe_load(args.file.read_text())
    if not isinstance(manifest, dict) or manifest.get("kind") != "FinetuneJob":
        sys.exit(f"{args.file}: expected a FinetuneJob manifest (kind: FinetuneJob)")
    name = (manifest.get("metadata") or {}).get("name")
    spec = manifest.get("spec") or {}
    if not name:
        sys.exit(f"{args.file}: metadata.name is missing")
    try:
        parsed = _parse_job_spec(spec)
    except ValueError as error:
        sys.exit(f"{args.file}: invalid spec: {error}")
    service = parsed.inference_service or "default"
    url = _client_url(args.redis_url)
    queue = JobQueue(connect(url), service)
    namespace = (manifest.get("metadata") or {}).get("namespace", args.namespace)
    queued = with_backoff(lambda: queue.submit(JobSubmission(name, namespace, spec)), "submit", url, attempts=5)
    if not queued:
        sys.exit(f"job {name!r} already exists in service {service!r}")
    print(f"finetunejob {name} queued on service {service}")
    return 0


def _job_rows(client, service: str | None) -> list[dict]:
    from flexllm.worker.queue.jobs import JobQueue, list_jobs

    rows = []
    for svc, job in list_jobs(client, service):
        queue = JobQueue(client, svc)
        latest = queue.latest_version(job)
        rows.append({"service": svc, "job": job, **queue.progress(job),
                     "adapter": f"{job}@v{latest['version']}" if latest else ""})
    return rows


def cmd_jobs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from flexllm.worker import protocol
    from flexllm.worker.queue.connection import connect

    client = connect(_client_url(args.redis_url))
    if args.watch:
        return _watch_jobs(client, args.service)
    table = Table("SERVICE", "JOB", "PHASE", "PROGRESS", "LOSS", "TOKENS/S", "ETA", "ADAPTER", "MESSAGE")
    for row in _job_rows(client, args.service):
        step, total = int(row.get("step") or 0), int(row.get("total_steps") or 0)
        progress = f"{step}/{total} ({100 * step // total}%)" if total else str(step)
        table.add_row(row["service"], row["job"], row.get("phase", ""), progress, row.get("loss", ""),
                      row.get("tokens_per_second", ""), row.get("eta_seconds", ""), row["adapter"],
                      row.get("message", ""))
    Console().print(table if table.row_count else f"no jobs (Redis prefix {protocol.PREFIX}:)")
    return 0


def _watch_jobs(client, service: str | None) -> int:
    """One progress bar per job, refreshed every second until every job is in a terminal phase."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from flexllm.worker.protocol import TERMINAL_PHASES

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[phase]} loss {task.fields[loss]}"), TimeRemainingColumn()) as bars:
        tasks: dict[str, int] = {}
        while True:
            rows = _job_rows(client, service)
            for row in rows:
                key = f"{row['service']}/{row['job']}"
                if key not in tasks:
                    tasks[key] = bars.add_task(key, total=None, phase="", loss="")
                total = int(row.get("total_steps") or 0) or None
                bars.update(tasks[key], completed=int(row.get("step") or 0), total=total,
                            phase=row.get("phase", ""), loss=row.get("loss", "-"))
            if not rows or all(row.get("phase") in TERMINAL_PHASES for row in rows):
                return 0
            time.sleep(1.0)


def cmd_demo(args: argparse.Namespace) -> int:
    from flexllm.worker.coserve.policy import SLO
    from flexllm.worker.demo import run_demo

    if not args.file.exists():
        sys.exit(f"{args.file} not found: run the demo from the repository root or pass -f")
    summary = run_demo(args.file, args.model, args.rate, SLO(args.ttft_ms / 1000, args.tpot_ms / 1000),
                       args.output, args.max_tokens_per_batch)
    return 0 if summary["phase"] == "Succeeded" else 1


COMMANDS = {"demo": cmd_demo, "serve": cmd_serve, "worker": cmd_worker, "generate": cmd_generate, "submit": cmd_submit,
            "jobs": cmd_jobs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "log_level"):
        configure_logging(args.log_level, args.log_json)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
