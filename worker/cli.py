"""The ``flexllm`` command: demo, serve, worker, generate, submit, jobs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path

from flexllm.worker.engine.config import EngineConfig
from flexllm.worker.options import POLICIES, SLO, WorkerOptions
from flexllm.worker.protocol import JobProgress

log = logging.getLogger("flexllm")

DEFAULT_SERVICE = "smollm2"  # examples/inferenceservice.yaml's name, which examples/finetunejob.yaml names
CANCEL_WAIT_S = 10.0  # `jobs delete`: how long a running job's engine gets to stop it


class CommandError(Exception):
    """A failure the user can act on: printed as one line on stderr, exit status 1."""


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
class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


SERVE_SLO_HELP = (f"{SLO.ttft_s * 1000:g} ms / {SLO.tpot_s * 1000:g} ms are the InferenceService defaults, sized "
                  "for a GPU; on a CPU a decode step of the bundled model takes ~35 ms alone, so use e.g. "
                  "--tpot-ms 300 there (`flexllm demo` measures the machine instead)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=EngineConfig.model,
                   help="bundled name, HF folder, .gguf, file://, pvc:// or hf://org/name[@revision] URI")
    g.add_argument("--dtype", default=EngineConfig.dtype, help="auto, float32, bfloat16, float16")
    g.add_argument("--device", default=EngineConfig.device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--max-tokens-per-batch", type=int, default=EngineConfig.max_tokens_per_batch,
                   help="tokens one engine iteration computes")
    g.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs, help="requests running at once")
    g.add_argument("--max-model-len", type=int, default=EngineConfig.max_model_len,
                   help="context length (default: the model's)")
    g.add_argument("--kv-cache-fraction", type=float, default=EngineConfig.kv_cache_fraction,
                   help="share of free memory for the KV cache")
    g.add_argument("--max-loras", type=int, default=EngineConfig.max_loras, help="adapters loaded at once")
    g.add_argument("--max-lora-rank", type=int, default=EngineConfig.max_lora_rank, help="largest adapter rank")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=EngineConfig.enable_prefix_caching,
                   help="reuse the KV of prompt prefixes already computed (keyed by adapter content)")


def _queue_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("queue")
    g.add_argument("--redis-url", default=None,
                   help="redis:// or rediss:// (env FLEXLLM_REDIS_URL; password in the URL or env REDIS_PASSWORD); "
                        "default: an embedded Redis started and stopped with this command")
    g.add_argument("--service", default=os.environ.get("FLEXLLM_SERVICE", DEFAULT_SERVICE),
                   help="the InferenceService whose requests and FinetuneJobs this process takes (env "
                        "FLEXLLM_SERVICE); the default is the one examples/finetunejob.yaml names")
    g.add_argument("--adapter-dir", default=os.environ.get("FLEXLLM_ADAPTER_DIR"),
                   help="adapter store root (env FLEXLLM_ADAPTER_DIR; default: <cache>/adapters)")
    g.add_argument("--reclaim-idle-ms", type=int, default=WorkerOptions.reclaim_idle_ms,
                   help="take over requests a silent engine holds for this long")
    g.add_argument("--drain-seconds", type=float, default=WorkerOptions.drain_s,
                   help="on SIGTERM/SIGINT: time to finish requests in flight and jobs' current steps before "
                        "handing the rest back to other replicas (a second signal exits at once)")
    g.add_argument("--max-deliveries", type=int, default=WorkerOptions.max_deliveries,
                   help="a request or job whose engines died this many times goes to the dead-letter stream")
    g.add_argument("--redis-outage-s", type=float, default=WorkerOptions.redis_outage_s,
                   help="exit (non-zero) once Redis is unreachable for this long")


def _coserve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("co-serving", SERVE_SLO_HELP)
    g.add_argument("--ttft-ms", type=float, default=SLO.ttft_s * 1000, help="time-to-first-token SLO")
    g.add_argument("--tpot-ms", type=float, default=SLO.tpot_s * 1000, help="time-per-output-token SLO")
    g.add_argument("--policy", default=WorkerOptions.policy, choices=POLICIES,
                   help="how inference and fine-tuning share an iteration")
    g.add_argument("--max-finetune-tokens", type=int, default=WorkerOptions.max_finetune_tokens,
                   help="fine-tuning tokens per iteration, at most")
    g.add_argument("--data-dir", action="append", default=None,
                   help="FinetuneJob datasets are read only from under this folder; repeatable (env "
                        f"FLEXLLM_DATA_DIR, {os.pathsep!r}-separated; default: the working directory)")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=URI",
                   help="a PEFT adapter (file://, pvc:// or hf:// URI, or path) served from the start; repeatable")


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p.add_argument("--log-json", action="store_true", help="JSON log lines")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None,
                   help="the service's Redis (env FLEXLLM_REDIS_URL); default: the embedded Redis of the "
                        "`flexllm serve` running on this machine")
    p.add_argument("--port", type=int, default=None,
                   help="with several local `flexllm serve`: the API port of the one to talk to")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexllm", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=description or text, formatter_class=HelpFormatter)

    demo = command("demo", "everything on this machine: embedded Redis, the bundled model behind the API, "
                           "the example FinetuneJob co-served with a generated inference load (about a minute)")
    demo.add_argument("--model", default=EngineConfig.model, help="the base model")
    demo.add_argument("-f", "--file", type=Path, default=Path("examples/finetunejob.yaml"), help="the FinetuneJob")
    demo.add_argument("--rate", type=float, default=None,
                      help="inference requests per second (Poisson); default: measured, half of what this "
                           "machine serves one request at a time")
    demo.add_argument("--ttft-ms", type=float, default=None,
                      help="time-to-first-token SLO; default: measured, 10x a lone prefill (at least 1 s). "
                           "Unlike `serve`'s fixed GPU-sized SLOs, the demo sizes its SLOs and rate "
                           "to the machine so it keeps its pace on a laptop or a loaded CPU")
    demo.add_argument("--tpot-ms", type=float, default=None,
                      help="time-per-output-token SLO; default: measured, 3x a lone decode step")
    demo.add_argument("--max-tokens-per-batch", type=int, default=EngineConfig.max_tokens_per_batch,
                      help="tokens one engine iteration computes")
    demo.add_argument("--max-seconds", type=float, default=240.0,
                      help="stop the job (cancelled) and report if it has not finished by then")
    demo.add_argument("--output", type=Path, default=Path("demo-output"), help="plot, summary, adapters")
    _log_args(demo)
    demo.set_defaults(log_level="warning")

    serve = command("serve", "OpenAI-compatible API + co-serving engine loop (embedded Redis without --redis-url)",
                    "OpenAI-compatible API + co-serving engine loop. /readyz turns 200 once a request can be "
                    "served; until then the API answers 503 with Retry-After. SIGTERM/SIGINT drain: no new "
                    "requests, those in flight finish (or are handed back), a running job is checkpointed "
                    "and handed back, then the process exits 0.")
    _engine_args(serve)
    _queue_args(serve)
    _coserve_args(serve)
    _log_args(serve)
    serve.add_argument("--host", default="0.0.0.0", help="listen address")
    serve.add_argument("--port", type=int, default=8000, help="API port")
    serve.add_argument("--served-model-name", default=None, help="the base model's name in requests (default: --model)")
    serve.add_argument("--api-key", default=os.environ.get("FLEXLLM_API_KEY"), help="env FLEXLLM_API_KEY")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    serve.add_argument("--max-prompt-tokens", type=int, default=32768, help="longest prompt")
    serve.add_argument("--max-queued-requests", type=int, default=1024, help="queue depth before 429")
    serve.add_argument("--request-timeout-s", type=float, default=600.0, help="longest wait for a next token")

    worker = command("worker", "the engine loop alone (consumes the service's request and job streams)")
    _engine_args(worker)
    _queue_args(worker)
    _coserve_args(worker)
    _log_args(worker)
    worker.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port")

    generate = command("generate", "generate offline, no server")
    _engine_args(generate)
    _log_args(generate)
    generate.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    generate.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--lora", default=None, metavar="NAME=PATH", help="a PEFT adapter folder to apply")

    submit = command("submit", "queue a FinetuneJob (the custom resource's YAML)")
    submit.add_argument("-f", "--file", required=True, type=Path, help="the FinetuneJob manifest")
    _client_args(submit)
    submit.add_argument("--namespace", default="default", help="unless the manifest names one")
    submit.add_argument("--model", default=EngineConfig.model,
                        help="whose tokenizer checks a local dataset before queueing (the service's base model)")
    submit.add_argument("--no-dataset-check", action="store_true",
                        help="queue without reading the dataset here (it lives where only the worker sees it)")

    jobs = command("jobs", "fine-tuning jobs and their progress; `jobs cancel NAME`, `jobs delete NAME`")
    _client_args(jobs)
    jobs.add_argument("--service", default=None, help="default: all services")
    jobs.add_argument("--watch", action="store_true", help="progress bars until every job has ended")
    actions = jobs.add_subparsers(dest="action", metavar="ACTION")
    for action, text in (("cancel", "stop a job (it keeps its progress and versions)"),
                         ("delete", "cancel a job if it runs, then remove its progress and versions")):
        p = actions.add_parser(action, help=text, description=text, formatter_class=HelpFormatter)
        p.add_argument("name", help="the FinetuneJob")
        p.add_argument("--service", default=None, help="needed only when several services have a job of that name")
    return parser


# -- helpers -------------------------------------------------------------------------------------
def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                        max_tokens_per_batch=args.max_tokens_per_batch, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, kv_cache_fraction=args.kv_cache_fraction,
                        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                        enable_prefix_caching=args.enable_prefix_caching)


def _adapter_dir(args: argparse.Namespace) -> str:
    from flexllm.worker.engine.loader import cache_dir

    return args.adapter_dir or str(cache_dir() / "adapters")


def _worker_options(args: argparse.Namespace, url: str) -> WorkerOptions:
    from flexllm.worker.engine.loader import resolve_model
    from flexllm.worker.names import InvalidNameError, validate_name

    pinned = {}
    for item in args.adapter:
        name, _, uri = item.partition("=")
        if not uri:
            raise CommandError("--adapter takes NAME=URI")
        try:
            validate_name(name, "adapter")
        except InvalidNameError as error:
            raise CommandError(f"--adapter: {error}") from None
        pinned[name] = str(resolve_model(uri))
    return WorkerOptions(url, args.service, _replica(), _adapter_dir(args), args.reclaim_idle_ms,
                         slo=SLO(args.ttft_ms / 1000, args.tpot_ms / 1000), policy=args.policy,
                         max_finetune_tokens=args.max_finetune_tokens, data_dirs=_data_dirs(args.data_dir),
                         pinned_adapters=pinned,
                         drain_s=args.drain_seconds, max_deliveries=args.max_deliveries,
                         redis_outage_s=args.redis_outage_s)


def _data_dirs(flags: list[str] | None) -> list[str]:
    """``--data-dir``, else ``$FLEXLLM_DATA_DIR`` (set and empty: none), else the working directory unless it
    is ``/``."""
    if flags:
        return flags
    if "FLEXLLM_DATA_DIR" in os.environ:
        return [d for d in os.environ["FLEXLLM_DATA_DIR"].split(os.pathsep) if d]
    return [str(Path.cwd())] if Path.cwd() != Path("/") else []


def _replica() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


def _parse_job_spec(spec: dict):
    from flexllm.worker.finetune.spec import FinetuneJobSpec

    return FinetuneJobSpec.model_validate(spec)


class _RedisForCommand:
    """The command's Redis URL; without one, an embedded server for the command's lifetime, announced to
    ``submit``/``jobs`` by a state file keyed by service and API port (removed on exit)."""

    def __init__(self, flag: str | None, service: str, port: int | None):
        from flexllm.worker.queue.connection import redis_url

        self.url, self.service, self.port = redis_url(flag), service, port
        self.embedded = self.state_file = None

    def __enter__(self) -> str:
        if self.url is None:
            from flexllm.worker.redis_server import EmbeddedRedis, EmbeddedState, write_state

            self.embedded = EmbeddedRedis()
            self.url = self.embedded.start()
            self.state_file = write_state(EmbeddedState(self.url, self.service, self.port, os.getpid()))
            log.info("embedded Redis at %s (for `flexllm submit`/`jobs`: %s)", self.url, self.state_file)
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self.embedded is not None:
            self.state_file.unlink(missing_ok=True)
            self.embedded.stop()


def _client(args: argparse.Namespace):
    """For submit/jobs: a client of the flag's or env's Redis, or of the embedded Redis of the one
    ``flexllm serve`` running here (``--port`` picks among several); says which on stderr."""
    import redis

    from flexllm.worker.queue.connection import connect, redacted, redis_url
    from flexllm.worker.redis_server import running_states

    url = redis_url(args.redis_url)
    if url is not None:
        where = redacted(url)
    else:
        states = [s for s in running_states() if args.port is None or s.port == args.port]
        if not states:
            raise CommandError("no Redis: no `flexllm serve` with an embedded Redis runs here"
                               + (f" on port {args.port}" if args.port is not None else "")
                               + "; start one, or pass --redis-url (or set FLEXLLM_REDIS_URL)")
        if len(states) > 1:
            raise CommandError("several `flexllm serve` run here: " + "; ".join(s.describe() for s in states)
                               + ": choose one with --port or --redis-url")
        url, where = states[0].url, states[0].describe()
    print(f"Redis: {where}", file=sys.stderr)
    client = connect(url)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise CommandError(f"Redis at {redacted(url)} is unreachable: {error}") from None
    except redis.AuthenticationError as error:
        raise CommandError(f"Redis at {redacted(url)} refused the password: {error}") from None
    return client


def served_services(client) -> set[str]:
    """Services with at least one live replica (replica hashes expire when a replica stops reporting)."""
    from flexllm.worker import protocol

    prefix = f"{protocol.PREFIX}:"
    return {key.removeprefix(prefix).partition(":replica:")[0]
            for key in client.scan_iter(match=protocol.replica_pattern("*"), count=500)}


def _unserved(service: str, served: set[str]) -> str:
    others = ", ".join(repr(s) for s in sorted(served)) or "none"
    return (f"no replica serves service {service!r} (served here: {others}); start one with "
            f"`flexllm serve --service {service}` or change spec.inferenceService")


def _check_dataset(spec, file: Path, model: str) -> None:
    """A local dataset must exist and hold valid lines (checked with ``model``'s tokenizer, the first
    200 valid lines at most); a few bad lines are a warning, as the worker skips them."""
    from transformers import AutoTokenizer

    from flexllm.worker.engine.loader import resolve_model
    from flexllm.worker.finetune.data import DatasetError, SequenceStream

    path = spec.dataset.resolve()
    if not path.is_file():
        raise CommandError(f"{file}: dataset {str(path)!r} not found (relative paths resolve against the current "
                           "directory; pass --no-dataset-check if only the worker sees it)")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    try:
        stream = SequenceStream(path, spec.dataset.format, tokenizer, spec.training.max_seq_len)
    except DatasetError as error:
        raise CommandError(f"{file}: {error}") from None
    for _ in stream.read_epoch():
        if stream.stats.valid >= 200:
            break
    stats = stream.stats
    if not stats.valid:
        raise CommandError(f"{file}: dataset {str(path)!r} has no valid {spec.dataset.format} line; first error: "
                           f"{stats.first_error or 'the file is empty'}")
    if stats.first_error:
        print(f"warning: {path}: some lines are invalid and will be skipped, first: {stats.first_error}",
              file=sys.stderr)


def _format_loss(loss: float | None) -> str:
    return "" if loss is None else f"{loss:.3f}"


class _Signals:
    """SIGTERM/SIGINT: the first one calls ``drain``; a second one calls ``force`` (exit without draining)."""

    def __init__(self, drain, force):
        self.drain, self.force, self.received = drain, force, 0

    def __call__(self, sig: int, frame: object = None) -> None:
        self.received += 1
        if self.received == 1:
            log.warning("%s: draining (send it again to exit at once)", signal.Signals(sig).name)
            self.drain()
        else:
            self.force()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)


def _engine_error(error: BaseException) -> CommandError:
    log.debug("engine failure", exc_info=error)
    return CommandError(f"the engine stopped: {type(error).__name__}: {error}")


# -- commands ------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    try:  # before anything starts: a port in use fails at once
        listener = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host
                                        else socket.AF_INET)
    except OSError as error:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
    import uvicorn

    from flexllm.worker.api.app import ApiConfig
    from flexllm.worker.server import api_and_worker

    stop = threading.Event()
    server: uvicorn.Server | None = None
    api = None

    def drain() -> None:  # no new requests; the engine finishes or hands back its work, then the API stops
        if api is not None:
            api.draining = True
        stop.set()

    def force() -> None:
        stop.set()
        if server is not None:
            server.should_exit = server.force_exit = True

    signals = _Signals(drain, force)
    signals.install()
    with listener, _RedisForCommand(args.redis_url, args.service, args.port) as url:
        config = ApiConfig(redis_url=url, service=args.service, model_name=args.served_model_name or args.model,
                           max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                           max_queued_requests=args.max_queued_requests, request_timeout_s=args.request_timeout_s,
                           api_key=args.api_key)
        app, worker = api_and_worker(_engine_config(args), _worker_options(args, url), config)
        api = app.state.api

        class DrainingServer(uvicorn.Server):
            def handle_exit(self, sig: int, frame: object) -> None:  # uvicorn's own would stop the API at once
                signals(sig, frame)

        server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                                               timeout_graceful_shutdown=5))
        engine_thread = worker.start_thread(stop)  # the API stops once the engine loop ended (or failed)
        threading.Thread(target=lambda: (engine_thread.join(), setattr(server, "should_exit", True)),
                         name="stop-api-after-engine", daemon=True).start()
        try:
            server.run(sockets=[listener])
        finally:
            stop.set()
            engine_thread.join(timeout=args.drain_seconds + 30)
    if worker.failed is not None:
        raise _engine_error(worker.failed)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from flexllm.worker.metrics import Metrics
    from flexllm.worker.serving import EngineWorker

    stop = threading.Event()

    def force() -> None:
        raise SystemExit(1)

    _Signals(stop.set, force).install()
    with _RedisForCommand(args.redis_url, args.service, None) as url:
        options = _worker_options(args, url)
        metrics = Metrics(options.slo)
        if args.metrics_port is not None:
            start_http_server(args.metrics_port, registry=metrics.registry)
        try:
            EngineWorker(_engine_config(args), options, metrics, _parse_job_spec).run(stop)
        except Exception as error:  # the reason in one line; the traceback with --log-level debug
            raise _engine_error(error) from None
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from flexllm.worker.engine.llm_engine import LLMEngine
    from flexllm.worker.engine.sampling import SamplingParams

    lora = None
    if args.lora:
        lora, _, path = args.lora.partition("=")
        if not path:
            raise CommandError("--lora takes NAME=PATH")
    engine = LLMEngine(_engine_config(args))
    if lora:
        engine.add_lora(lora, path)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    for out in engine.generate(args.prompt, params, lora=lora, use_tqdm=True):
        print(out.text)
    return 0


def read_job_manifest(file: Path) -> tuple[str, dict, dict]:
    """A FinetuneJob manifest -> (name, metadata, spec), or a ``CommandError`` saying what is wrong."""
    import yaml

    try:
        manifest = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise CommandError(f"{file}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "FinetuneJob":
        raise CommandError(f"{file}: expected a FinetuneJob manifest (kind: FinetuneJob)")
    metadata, spec = manifest.get("metadata") or {}, manifest.get("spec") or {}
    if not metadata.get("name"):
        raise CommandError(f"{file}: metadata.name is missing")
    return metadata["name"], metadata, spec


def cmd_submit(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flexllm.worker.names import InvalidNameError, validate_name, validate_service
    from flexllm.worker.protocol import JobSubmission
    from flexllm.worker.queue.jobs import JobQueue

    name, metadata, spec = read_job_manifest(args.file)
    try:
        parsed = _parse_job_spec(spec)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise CommandError(f"{args.file}: invalid spec: {problems}") from None
    try:
        validate_name(name, "job")
        service = validate_service(parsed.inference_service or DEFAULT_SERVICE)
    except InvalidNameError as error:
        raise CommandError(f"{args.file}: {error}") from None
    if not args.no_dataset_check:
        _check_dataset(parsed, args.file, args.model)
    client = _client(args)
    queue = JobQueue(client, service)
    if not queue.submit(JobSubmission(name, metadata.get("namespace", args.namespace), spec)):
        raise CommandError(f"job {name!r} already exists in service {service!r} (`flexllm jobs delete {name}`)")
    print(f"finetunejob {name} queued on service {service}")
    served = served_services(client)
    if service not in served:
        print(f"warning: {_unserved(service, served)}; the job stays Queued until then", file=sys.stderr)
    return 0


def _job_rows(client, service: str | None) -> list[tuple[str, str, JobProgress, str]]:
    """(service, job, progress, latest adapter version) of every job; a queued job's message says when no
    replica serves its service."""
    from flexllm.worker.queue.jobs import JobQueue, list_jobs

    served = served_services(client)
    rows = []
    for svc, job in list_jobs(client, service):
        queue = JobQueue(client, svc)
        latest, progress = queue.latest_version(job), queue.progress(job)
        if progress.phase in ("Pending", "Queued") and svc not in served:
            progress = replace(progress, message=_unserved(svc, served))
        rows.append((svc, job, progress, latest.name if latest else ""))
    return rows


def _find_job(client, name: str, service: str | None) -> str:
    """The service of job ``name``; a ``CommandError`` if there is none or several."""
    from flexllm.worker.queue.jobs import list_jobs

    services = [svc for svc, job in list_jobs(client, service) if job == name]
    if not services:
        raise CommandError(f"no job {name!r}" + (f" in service {service!r}" if service else ""))
    if len(services) > 1:
        raise CommandError(f"job {name!r} exists in services {', '.join(services)}: choose one with --service")
    return services[0]


def _cancel_or_delete(client, args: argparse.Namespace) -> int:
    import time

    from flexllm.worker.names import InvalidNameError, validate_name
    from flexllm.worker.protocol import TERMINAL_PHASES
    from flexllm.worker.queue.jobs import JobQueue

    try:
        validate_name(args.name, "job")
    except InvalidNameError as error:
        raise CommandError(str(error)) from None
    service = _find_job(client, args.name, args.service)
    queue = JobQueue(client, service)
    phase = queue.progress(args.name).phase
    if phase not in TERMINAL_PHASES:
        queue.cancel(args.name, f"cancelled with `flexllm jobs {args.action}`")  # stops within a second
        if phase != "Running":
            queue.set_progress(args.name, phase="Cancelled", message="cancelled before it started")
        deadline = time.monotonic() + CANCEL_WAIT_S
        while args.action == "delete" and queue.progress(args.name).phase == "Running" \
                and time.monotonic() < deadline:  # its engine would write progress again after the delete
            time.sleep(0.2)
    if args.action == "delete":
        queue.delete(args.name)
        print(f"finetunejob {args.name} deleted from service {service}")
    else:
        print(f"finetunejob {args.name} cancelled on service {service}" if phase not in TERMINAL_PHASES
              else f"finetunejob {args.name} had already ended ({phase})")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from flexllm.worker import protocol

    client = _client(args)
    if args.action is not None:
        return _cancel_or_delete(client, args)
    if args.watch:
        return _watch_jobs(client, args.service)
    table = Table("SERVICE", "JOB", "PHASE", "PROGRESS", "LOSS", "TOKENS/S", "ETA", "ADAPTER", "MESSAGE")
    for svc, job, progress, adapter in _job_rows(client, args.service):
        speed = "" if progress.tokens_per_second is None else f"{progress.tokens_per_second:.1f}"
        table.add_row(svc, job, progress.phase or "", progress.display, _format_loss(progress.loss), speed,
                      progress.eta, adapter, progress.message or "")
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
            for svc, job, progress, _ in rows:
                key = f"{svc}/{job}"
                if key not in tasks:
                    tasks[key] = bars.add_task(key, total=None, phase="", loss="")
                bars.update(tasks[key], completed=progress.step or 0, total=progress.total_steps,
                            phase=progress.phase or "", loss=_format_loss(progress.loss) or "-")
            if not rows or all(progress.phase in TERMINAL_PHASES for _, _, progress, _ in rows):
                return 0
            time.sleep(1.0)


def cmd_demo(args: argparse.Namespace) -> int:
    from flexllm.worker.demo import run_demo

    if not args.file.exists():
        raise CommandError(f"{args.file} not found: run the demo from the repository root or pass -f")
    slo_ms = (args.ttft_ms, args.tpot_ms)
    summary = run_demo(args.file, args.model, args.rate, slo_ms, args.output, args.max_tokens_per_batch,
                       args.max_seconds)
    return 0 if summary["phase"] == "Succeeded" else 1


COMMANDS = {"demo": cmd_demo, "serve": cmd_serve, "worker": cmd_worker, "generate": cmd_generate, "submit": cmd_submit,
            "jobs": cmd_jobs}


def main(argv: list[str] | None = None) -> int:
    """Runs a command; what the user can fix comes out as one line on stderr and exit status 1."""
    import redis

    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "warning"), getattr(args, "log_json", False))
    try:
        return COMMANDS[args.command](args)
    except CommandError as error:
        message = str(error)
    except OSError as error:  # a missing or unreadable file
        message = f"{error.filename}: {error.strerror}" if error.filename else str(error)
    except redis.RedisError as error:  # Redis went away during the command
        message = f"Redis: {error}"
    except KeyboardInterrupt:
        return 130
    print(f"flexllm {args.command}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
