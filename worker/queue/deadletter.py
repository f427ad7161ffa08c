"""Poison messages: an entry delivered more than ``max_deliveries`` times goes to the dead-letter stream.

Every delivery of a stream entry to a consumer (XREADGROUP, then each XAUTOCLAIM after its consumer
stopped answering) raises the group's delivery counter of the entry; heartbeats (XCLAIM JUSTID) do
not. An entry whose consumers keep dying while they process it would otherwise stop every replica
that takes it over, one after the other (layout: ``protocol.dead_letter_stream``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from flexllm.worker import protocol
from flexllm.worker.queue.connection import deliveries

T = TypeVar("T")

log = logging.getLogger(__name__)


def dead_letter(client: redis.Redis, service: str, stream: str, entry_id: str, data: str | None, error: str,
                delivered: int) -> None:
    """Move an entry to the dead-letter stream with ``error``: added there, then acknowledged and deleted."""
    record = {"stream": stream, "entry": entry_id, "data": data if data is not None else "", "error": error,
              "deliveries": delivered, "time": int(time.time())}
    pipe = client.pipeline(transaction=True)
    pipe.xadd(protocol.dead_letter_stream(service), record, maxlen=protocol.DEAD_LETTER_MAXLEN, approximate=True)
    pipe.xack(stream, protocol.ENGINE_GROUP, entry_id)
    pipe.xdel(stream, entry_id)
    pipe.execute()
    log.error("dead-lettered %s entry %s after %d deliveries: %s", stream, entry_id, delivered, error)


def dead_letters(client: redis.Redis, service: str) -> list[dict[str, str]]:
    """The dead-letter records of a service, oldest first (for operators and tests)."""
    return [fields for _, fields in client.xrange(protocol.dead_letter_stream(service))]


def screen(client: redis.Redis, service: str, stream: str, entries: list[tuple[str, dict[str, str], bool]],
           parse: Callable[[str], T], what: str, max_deliveries: int,
           on_poison: Callable[[T, str], None]) -> list[tuple[str, T, bool]]:
    """The claimed ``(entry_id, fields, reclaimed)`` entries that can be processed, parsed. An entry
    ``parse`` refuses, and one delivered more than ``max_deliveries`` times (``on_poison`` answers its
    client first), are dead-lettered instead."""
    kept = []
    for entry_id, fields, reclaimed in entries:
        delivered = deliveries(client, stream, entry_id) if reclaimed else 1
        try:
            message = parse(fields["data"])
        except (KeyError, TypeError, ValueError) as error:  # no key of its is safe to touch
            dead_letter(client, service, stream, entry_id, fields.get("data"), f"unreadable {what} entry: {error}",
                        delivered)
            continue
        if delivered > max_deliveries:
            error = poison_error(what, delivered)
            on_poison(message, error)
            dead_letter(client, service, stream, entry_id, fields["data"], error, delivered)
            continue
        kept.append((entry_id, message, reclaimed))
    return kept


def poison_error(what: str, delivered: int) -> str:
    return (f"the {what} was delivered {delivered} times and its engine stopped each time while processing "
            "it; it was moved to the dead-letter stream")

