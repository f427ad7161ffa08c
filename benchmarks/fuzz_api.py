"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis + hypothesis) against ``flexllm serve``.

    python benchmarks/fuzz_api.py [--model DIR] [--examples 400] [--seconds 300]

Starts ``flexllm serve`` on 127.0.0.1 (embedded Redis; by default on a tiny random Llama written to a
temporary folder), then sends schema-valid and schema-violating requests to every operation, round
after round, until ``--seconds`` are spent. Any 5xx is a failure; so is a server whose engine stopped
(``/healthz``) or whose greedy completion changed. Prints inputs tried, seconds and failures, and
writes benchmarks/results/fuzz_api.json. ``tests/service/test_service_fuzz.py`` runs ``fuzz`` briefly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

GREEDY = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@dataclass
class FuzzResult:
    inputs: int = 0
    seconds: float = 0.0
    by_status: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # one line per 5xx: operation, status, body

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "seconds": round(self.seconds, 1), "failures": len(self.failures),
                "by_status": dict(sorted(self.by_status.items())), "failure_samples": self.failures[:20]}


def greedy_text(base_url: str) -> str:
    reply = httpx.post(f"{base_url}/v1/completions", json=GREEDY, timeout=120)
    reply.raise_for_status()
    return reply.json()["choices"][0]["text"]


def fuzz(base_url: str, examples: int, seed: int | None = None, deadline: float | None = None,
         result: FuzzResult | None = None, model: str = "tiny") -> FuzzResult:
    """``examples`` inputs per operation and generation mode (schema-valid, then schema-violating).
    Schema-valid bodies name the served ``model``, so they reach the engine instead of a 404."""
    result = result or FuzzResult()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    began = time.monotonic()
    for operation in (r.ok() for r in schema.get_all_operations()):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(base_url, operation, mode, examples, seed, deadline, result, model)
    result.seconds += time.monotonic() - began
    return result


def _fuzz_operation(base_url: str, operation, mode: GenerationMode, examples: int, seed: int | None,
                    deadline: float | None, result: FuzzResult, model: str) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is not None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case) -> None:
        if deadline is not None and time.monotonic() > deadline:
            return
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        response = case.call(base_url=base_url, timeout=120)
        result.inputs += 1
        result.by_status[response.status_code] = result.by_status.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            result.failures.append(f"{operation.label} {mode.value}: {response.status_code} "
                                   f"{response.text[:300]} <- {case.body!r:.300}")

    with contextlib.suppress(Unsatisfiable):  # a schema-violating input of an operation that takes none
        send()


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_tiny_checkpoint  # the tests' tiny random Llama

    return write_tiny_checkpoint(folder, "llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: a tiny random Llama")
    parser.add_argument("--examples", type=int, default=400, help="inputs per operation and mode, per round")
    parser.add_argument("--seconds", type=float, default=300.0, help="keep fuzzing in rounds for this long")
    args = parser.parse_args()
    from common import write_json

    from flexllm.worker.net import free_port

    with tempfile.TemporaryDirectory(prefix="flexllm-fuzz-") as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "model"))
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "flexllm.worker.cli", "serve", "--model", model, "--port", str(port),
             "--host", "127.0.0.1", "--served-model-name", "tiny", "--max-model-len", "256",
             "--adapter-dir", str(Path(tmp) / "adapters"), "--log-level", "warning"],
            env={**os.environ, "HOME": tmp}, cwd=tmp)
        try:
            deadline = time.monotonic() + 300
            while not _ready(base_url):
                assert server.poll() is None and time.monotonic() < deadline, "flexllm serve did not start"
                time.sleep(0.5)
            before = greedy_text(base_url)
            result, rounds, stop = FuzzResult(), 0, time.monotonic() + args.seconds
            while time.monotonic() < stop:
                fuzz(base_url, args.examples, deadline=stop, result=result)
                rounds += 1
            healthy = httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200
            same = greedy_text(base_url) == before
        finally:
            server.terminate()
            server.wait(timeout=60)
    summary = result.as_dict() | {"rounds": rounds, "engine_alive": healthy, "greedy_unchanged": same}
    print(f"inputs tried: {result.inputs}  seconds: {result.seconds:.0f}  failures: {len(result.failures)}  "
          f"engine alive: {healthy}  greedy unchanged: {same}")
    print("by status:", summary["by_status"])
    for line in result.failures[:20]:
        print("FAIL", line)
    print("wrote", write_json("fuzz_api", summary))


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()
