"""Redis connections: URL and password from flags or the environment, TLS, retry with backoff."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from flexllm.worker import protocol

log = logging.getLogger(__name__)

URL_ENV = "FLEXLLM_REDIS_URL"
PASSWORD_ENV = "REDIS_PASSWORD"
TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError)
T = TypeVar("T")


def redis_url(flag: str | None) -> str | None:
    """The Redis URL from ``--redis-url`` or ``$FLEXLLM_REDIS_URL`` (``redis://`` or TLS ``rediss://``)."""
    return flag or os.environ.get(URL_ENV) or None


def redacted(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _options(url: str) -> dict:
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {scheme!r} in {redacted(url)}: use redis:// or rediss://")
    options: dict = dict(decode_responses=True, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30,
                         retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=3),
                         retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    if os.environ.get(PASSWORD_ENV) and urlsplit(url).password is None:
        options["password"] = os.environ[PASSWORD_ENV]
    return options


def connect(url: str) -> redis.Redis:
    """A client for ``url``; the password is the URL's or ``$REDIS_PASSWORD``. Does not connect yet."""
    return redis.Redis.from_url(url, **_options(url))


def ensure_group(client: redis.Redis, stream: str) -> None:
    """Create the engines' consumer group on ``stream`` (and the stream) unless it exists."""
    try:
        client.xgroup_create(stream, protocol.ENGINE_GROUP, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


HANDED_BACK_IDLE_MS = 10**9  # longer than any engine's reclaim idle time


def hand_back(client: redis.Redis, stream: str, consumer: str, entry_ids: list[str]) -> None:
    """Leave our pending entries to the other engines: marked idle for long, the next XAUTOCLAIM takes them.

    Each entry's delivery counter is lowered by one (the next XAUTOCLAIM raises it again): a hand-back
    is no failed delivery, so drained work never comes nearer the dead-letter stream (``protocol``)."""
    for entry_id in entry_ids:
        client.xclaim(stream, protocol.ENGINE_GROUP, consumer, 0, [entry_id], idle=HANDED_BACK_IDLE_MS,
                      retrycount=max(deliveries(client, stream, entry_id) - 1, 0), justid=True)


def deliveries(client: redis.Redis, stream: str, entry_id: str) -> int:
    """How many times the engines' group delivered ``entry_id`` (0 once it is acknowledged)."""
    pending = client.xpending_range(stream, protocol.ENGINE_GROUP, min=entry_id, max=entry_id, count=1)
    return int(pending[0]["times_delivered"]) if pending else 0


def connect_async(url: str, max_connections: int, wait_s: float) -> aredis.Redis:
    """An asyncio client with at most ``max_connections``; a command waits up to ``wait_s`` for a free one
    (then ``redis.ConnectionError``) instead of opening more."""
    pool = aredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait_s,
                                                  **_options(url))
    return aredis.Redis.from_pool(pool)


def with_backoff(call: Callable[[], T], what: str, url: str, max_delay: float = 30.0,
                 attempts: int | None = None) -> T:
    """Run ``call`` until Redis answers, logging a clear error and waiting 0.5 s, 1 s, ... ``max_delay``."""
    delay, attempt = 0.5, 0
    while True:
        try:
            return call()
        except TRANSIENT_ERRORS as error:
            attempt += 1
            if attempts is not None and attempt >= attempts:
                raise ConnectionError(f"Redis at {redacted(url)} is unreachable ({what}): {error}") from error
            log.error("Redis at %s is unreachable (%s): %s; retrying in %.1f s", redacted(url), what, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
