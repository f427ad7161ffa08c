"""The second Kubernetes tier: a real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, and kwok simulating the nodes) started once per test session on loopback.

The binaries come from ``KUBEBUILDER_ASSETS`` (envtest's convention) or from the cache that
``scripts/build_control_plane.sh`` fills. Without them (a laptop with no Go) the whole tier is skipped
with one line; on CI (``CI`` set) or with ``FLEXLLM_REQUIRE_CONTROL_PLANE=1`` their absence fails it.

kwok is what cannot exist here otherwise: it plays the kubelets of two fake nodes (``kwok-cpu`` and
``kwok-gpu``, the latter with ``nvidia.com/gpu`` allocatable and the GPU taint), so pods are scheduled
by the real scheduler and reported Running and Ready; no container runs. Tests that need a container's
process (the worker) start the pod's own command themselves.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from flexllm.worker.net import free_port

from ..conftest import stop_process_group
from ..operator.conftest import die_with_parent, poll

REPO = Path(__file__).resolve().parents[2]
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kwok-stages.yaml")
CLIENTS = ("kubectl", "helm")
TOOLS_BIN = REPO / ".cache" / "bin"  # the project's kubectl and helm (scripts/install_kube_tools.sh)
SERVICE_CIDR = "10.96.0.0/16"  # virtual IPs the API server allocates to Services: no traffic goes there


def kubernetes_version() -> str:
    """The k8s.io/kubernetes version pinned in scripts/controlplane/go.mod."""
    for line in (REPO / "scripts" / "controlplane" / "go.mod").read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "k8s.io/kubernetes":
            return words[1]
    raise AssertionError("scripts/controlplane/go.mod pins no k8s.io/kubernetes")


def binary_dirs() -> list[Path]:
    """Where the control plane binaries are looked for, first match wins."""
    cache = Path(os.environ.get("FLEXLLM_CONTROL_PLANE_DIR", Path.home() / ".cache" / "flexllm" / "controlplane"))
    assets = [Path(os.environ["KUBEBUILDER_ASSETS"])] if os.environ.get("KUBEBUILDER_ASSETS") else []
    return [*assets, cache / kubernetes_version() / "bin"]


def find_binaries() -> tuple[dict[str, Path], list[str]]:
    """({name: path} of the binaries found, [names missing]): control plane first, then kubectl and helm."""
    found: dict[str, Path] = {}
    for name in BINARIES:
        path = next((d / name for d in binary_dirs() if (d / name).is_file()), None)
        if path is not None:
            found[name] = path
    for name in CLIENTS:  # the project's own, never one found on PATH (as tests/conftest.py's kube_tool)
        if os.access(TOOLS_BIN / name, os.X_OK):
            found[name] = TOOLS_BIN / name
    return found, [name for name in (*BINARIES, *CLIENTS) if name not in found]


def control_plane_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("FLEXLLM_REQUIRE_CONTROL_PLANE") == "1"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Certificates:
    """A throwaway CA, the API server's serving certificate, an admin client certificate, and the
    ServiceAccount token signing key pair."""

    folder: Path

    def __post_init__(self) -> None:
        f = self.folder
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=flexllm-test-ca",
                "-keyout", str(f / "ca.key"), "-out", str(f / "ca.crt"))
        self._issue("server", "/CN=kube-apiserver",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc")
        self._issue("admin", "/O=system:masters/CN=flexllm-test-admin", "extendedKeyUsage=clientAuth")
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(f / "sa.key"))
        openssl("pkey", "-in", str(f / "sa.key"), "-pubout", "-out", str(f / "sa.pub"))

    def _issue(self, name: str, subject: str, extension: str) -> None:
        f = self.folder
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
                "-CA", str(f / "ca.crt"), "-CAkey", str(f / "ca.key"), "-addext", extension,
                "-keyout", str(f / f"{name}.key"), "-out", str(f / f"{name}.crt"))

    def path(self, name: str) -> str:
        return str(self.folder / name)


def write_kubeconfig(path: Path, server: str, ca: str, user: dict[str, str], namespace: str = "default") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "flexllm-test",
        "clusters": [{"name": "flexllm-test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "flexllm-test", "user": user}],
        "contexts": [{"name": "flexllm-test",
                      "context": {"cluster": "flexllm-test", "user": "flexllm-test", "namespace": namespace}}],
    }))
    return path


def fake_node(name: str, gpus: int) -> dict:
    """A Node that kwok manages (annotation kwok.x-k8s.io/node=fake); GPU nodes carry the usual taint."""
    allocatable = {"cpu": "16", "memory": "64Gi", "pods": "110", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                     "labels": {"kubernetes.io/hostname": name, "type": "kwok",
                                **({"nvidia.com/gpu.present": "true"} if gpus else {})}},
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}] if gpus else []},
        "status": {"allocatable": allocatable, "capacity": allocatable},
    }


@dataclass
class ControlPlane:
    """A running control plane: ``kubeconfig`` (admin), ``env`` (os.environ + KUBECONFIG + PATH with the
    project's kubectl and helm), ``server`` (https URL), and ``kubectl(...)``."""

    folder: Path
    binaries: dict[str, Path]
    certs: Certificates = field(init=False)
    server: str = ""
    kubeconfig: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.folder / "certs").mkdir(parents=True)
        self.certs = Certificates(self.folder / "certs")
        self.kubeconfig = self.folder / "admin.kubeconfig"
        path = os.pathsep.join([str(self.binaries["kubectl"].parent), str(self.binaries["helm"].parent),
                                os.environ.get("PATH", "")])
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": path,
                    "HELM_CACHE_HOME": str(self.folder / "helm" / "cache"),
                    "HELM_CONFIG_HOME": str(self.folder / "helm" / "config"),
                    "HELM_DATA_HOME": str(self.folder / "helm" / "data")}

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        with (self.folder / f"{name}.log").open("w") as sink:
            process = subprocess.Popen([str(self.binaries[name]), *args], stdout=sink, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self.processes[name] = process
        return process

    def _alive(self, name: str) -> None:
        if self.processes[name].poll() is not None:
            raise AssertionError(f"{name} exited ({self.processes[name].returncode}):\n{self.log(name)[-4000:]}")

    def _healthy(self, name: str, url: str, verify: ssl.SSLContext | bool = True) -> bool:
        self._alive(name)
        try:
            return httpx.get(url, timeout=2, verify=verify).status_code == 200
        except httpx.TransportError:
            return False

    def start(self) -> None:
        c = self.certs
        client, peer = free_port(), free_port()
        etcd = f"http://127.0.0.1:{client}"
        self._start("etcd", f"--data-dir={self.folder / 'etcd'}", f"--listen-client-urls={etcd}",
                    f"--advertise-client-urls={etcd}", f"--listen-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-cluster=default=http://127.0.0.1:{peer}", "--unsafe-no-fsync", "--log-level=warn")
        poll(lambda: self._healthy("etcd", f"{etcd}/health"), timeout=60, what="etcd /health")

        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        self._start("kube-apiserver", f"--etcd-servers={etcd}", "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1", f"--secure-port={port}",
                    f"--cert-dir={self.folder / 'apiserver'}", f"--tls-cert-file={c.path('server.crt')}",
                    f"--tls-private-key-file={c.path('server.key')}", f"--client-ca-file={c.path('ca.crt')}",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={c.path('sa.pub')}",
                    f"--service-account-signing-key-file={c.path('sa.key')}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=RBAC",
                    "--allow-privileged=true", "--enable-priority-and-fairness=false",
                    "--endpoint-reconciler-type=none")
        write_kubeconfig(self.kubeconfig, self.server, c.path("ca.crt"),
                         {"client-certificate": c.path("admin.crt"), "client-key": c.path("admin.key")})
        poll(lambda: self._healthy("kube-apiserver", f"{self.server}/readyz", self.admin_tls()), timeout=180,
             interval=0.5, what="kube-apiserver /readyz")

        kubeconfig = f"--kubeconfig={self.kubeconfig}"
        self._start("kube-controller-manager", kubeconfig, "--leader-elect=false", "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}", f"--service-account-private-key-file={c.path('sa.key')}",
                    f"--root-ca-file={c.path('ca.crt')}", f"--service-cluster-ip-range={SERVICE_CIDR}")
        self._start("kube-scheduler", kubeconfig, "--leader-elect=false", "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}")
        self._start("kwok", kubeconfig, f"--config={self.binaries['kwok-stages.yaml']}", "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                    "--node-lease-duration-seconds=40",  # heartbeats through Leases, as kubelets do
                    "--node-ip=127.0.0.1", "--cidr=10.244.0.0/16", f"--node-port={free_port()}")
        for node in (fake_node("kwok-cpu", gpus=0), fake_node("kwok-gpu", gpus=2)):
            self.kubectl("apply", "-f", "-", input=json.dumps(node))
        poll(lambda: self._nodes_ready(), timeout=60, interval=0.5, what="kwok's nodes Ready")
        # The ServiceAccount controller's default account: pods need it to be admitted.
        poll(lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
             timeout=60, interval=0.5, what="the default ServiceAccount")

    def admin_tls(self) -> ssl.SSLContext:
        """TLS for httpx as the admin: trusts the test CA, presents the admin client certificate."""
        context = ssl.create_default_context(cafile=self.certs.path("ca.crt"))
        context.load_cert_chain(self.certs.path("admin.crt"), self.certs.path("admin.key"))
        return context

    def _nodes_ready(self) -> bool:
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self._alive(name)
        ready = self.kubectl("get", "nodes", "-o",
                             "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{end}",
                             check=False).stdout
        return ready == "TrueTrue"

    def stop(self) -> None:
        """SIGTERM in reverse start order (SIGKILL if one lingers); every process is waited for."""
        for process in reversed(self.processes.values()):
            stop_process_group(process)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        """The project's kubectl against this control plane (admin unless ``kubeconfig`` says otherwise)."""
        command = [str(self.binaries["kubectl"]), f"--kubeconfig={kubeconfig or self.kubeconfig}",
                   f"--cache-dir={self.folder / 'kubectl-cache'}", "--request-timeout=30s", *args]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=90, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.binaries["helm"]), f"--kubeconfig={self.kubeconfig}", *args],
                                capture_output=True, text=True, timeout=180, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` with a TokenRequest token."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration=2h").stdout.strip()
        return write_kubeconfig(path, self.server, self.certs.path("ca.crt"), {"token": token}, namespace)

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        data = json.loads(self.kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout)["data"]
        return base64.b64decode(data[key]).decode()


@contextlib.contextmanager
def running_control_plane(folder: Path, binaries: dict[str, Path]) -> Iterator[ControlPlane]:
    plane = ControlPlane(folder, binaries)
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()


def missing_control_plane() -> str | None:
    """Why the control plane cannot start here, or None."""
    _, missing = find_binaries()
    if not missing:
        return None
    where = ", ".join(str(d) for d in binary_dirs())
    return (f"no real Kubernetes control plane: {', '.join(missing)} not found in {where} or .cache/bin "
            f"(bash scripts/build_control_plane.sh builds it with Go; bash scripts/install_kube_tools.sh "
            f"installs kubectl and helm)")


SKIPPED = pytest.StashKey[str]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the binaries (and not on CI), the tests that use the control plane are left out, said in one line."""
    tier = [item for item in items if "control_plane" in getattr(item, "fixturenames", ())]
    reason = missing_control_plane() if tier else None
    if reason is None or control_plane_required():
        return
    items[:] = [item for item in items if item not in tier]
    config.hook.pytest_deselected(items=tier)
    config.stash[SKIPPED] = f"{len(tier)} control-plane tests skipped: {reason}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if SKIPPED in config.stash:
        terminalreporter.write_line(config.stash[SKIPPED])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Only control-plane tests selected, and all skipped: a skip, not pytest's 'no tests collected'."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and SKIPPED in session.config.stash:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    reason = missing_control_plane()
    if reason is not None:
        pytest.fail(reason, pytrace=False)  # on CI; elsewhere these tests were left out at collection
    binaries, _ = find_binaries()
    started = time.monotonic()
    with running_control_plane(tmp_path_factory.mktemp("control-plane"), binaries) as plane:
        print(f"control plane {kubernetes_version()} up in {time.monotonic() - started:.1f} s at {plane.server}",
              file=sys.stderr)
        yield plane
