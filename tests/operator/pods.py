"""What a kubelet and a reader of kubectl do, for tests of both Kubernetes tiers (emulator and real API server).

- ``worker_pod``: starts a worker Deployment's container command as a local process, with the container's
  env resolved the way the kubelet would (``$(VAR)`` in args, ``fieldRef`` metadata.name for POD_NAME, a
  Secret's value for ``secretKeyRef``). The only substitutions are what a pod gets from its mounts and
  network: the adapter store (``/adapters``, the PVC) is a local folder, and the port a free local one.
- ``table`` / ``status_of``: kubectl's own output, parsed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from flexllm.worker.net import free_port

from ..conftest import stop_process_group
from .conftest import die_with_parent, poll

REPO = Path(__file__).resolve().parents[2]

Kubectl = Callable[..., subprocess.CompletedProcess]


def table(kubectl: Kubectl, *args: str) -> dict[str, dict[str, str]]:
    """`kubectl get <args>` as {name: {COLUMN: value}} (columns split at the header's offsets)."""
    header, *rows = kubectl("get", *args).stdout.splitlines()
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    names = header.split()

    def cells(row: str) -> dict[str, str]:
        bounds = zip(starts, starts[1:] + [None], strict=True)
        return {name: row[a:b].strip() for name, (a, b) in zip(names, bounds, strict=True)}

    return {cells(row)["NAME"]: cells(row) for row in rows}


def status_of(kubectl: Kubectl, kind: str, name: str, *args: str) -> dict[str, Any]:
    return json.loads(kubectl("get", kind, name, *args, "-o", "json").stdout).get("status", {})


def pod_env(container: dict[str, Any], pod_name: str, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The container's env as the kubelet resolves it (value, fieldRef metadata.name, secretKeyRef)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item or not source:  # the API server drops an empty value: the kubelet sets ""
            env[item["name"]] = item.get("value", "")
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"], ref["key"]]
        else:
            raise AssertionError(f"the test cannot resolve env {item}")
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in container args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    assert flag in args, f"the Deployment renders no {flag}"
    at = args.index(flag)
    return [*args[:at + 1], value, *args[at + 2:]]


@dataclass
class Replica:
    """The worker process standing in for one pod of the Deployment."""

    name: str
    base_url: str
    adapter_dir: Path
    log: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def worker_pod(container: dict[str, Any], pod_name: str, secrets: dict[tuple[str, str], str], folder: Path,
               adapter_dir: Path, extra_args: list[str]) -> Iterator[Replica]:
    """Runs the container's command (``flexllm serve ...``) as the pod ``pod_name`` until /readyz answers 200."""
    assert container["command"] == ["flexllm"]
    env = pod_env(container, pod_name, secrets)
    env["HOME"] = str(folder / "home")  # the pod's /tmp emptyDir
    assert env["FLEXLLM_DATA_DIR"] == "examples"  # the image's bundled examples, under its working directory
    env["FLEXLLM_DATA_DIR"] = str(REPO / "examples")
    args = [expand(arg, env) for arg in container["args"]]
    assert args[0] == "serve"
    port = free_port()
    args = replace_flag(args, "--adapter-dir", str(adapter_dir))  # the adapter PVC's mount
    args = replace_flag(args, "--port", str(port))
    args += ["--host", "127.0.0.1", *extra_args]
    log = folder / f"{pod_name}.log"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "flexllm.worker.cli", *args], cwd=folder,
                                   env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=die_with_parent)
    running = Replica(pod_name, f"http://127.0.0.1:{port}", adapter_dir, log, process)
    try:
        def ready() -> bool:
            assert process.poll() is None, f"the worker exited:\n{running.log_text()}"
            try:
                return httpx.get(f"{running.base_url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        poll(ready, timeout=120, interval=0.5, what="the worker's /readyz")
        yield running
    finally:
        stop_process_group(process)

