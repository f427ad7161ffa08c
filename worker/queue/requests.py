"""The request stream (consumer group ``engines``) and the per-request output streams.

Delivery is at-least-once: an engine acknowledges (XACK + XDEL) a request only after its final chunk
is in Redis. A request left pending by a dead engine is reclaimed with XAUTOCLAIM by another one,
which resumes it after the tokens already streamed (see ``RequestConsumer.emitted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis
import redis.asyncio as aredis

from flexllm.worker import protocol
from flexllm.worker.queue.connection import TRANSIENT_ERRORS, deliveries, ensure_group, hand_back
from flexllm.worker.queue.deadletter import dead_letter, poison_error
from flexllm.worker.queue.messages import InferenceRequest, OutputChunk

BLOCK_MS = 2000  # longest blocking read: well under the client's socket timeout
RETRY_S = 0.5  # between reads while Redis is unreachable
ALREADY_PUSHED = "equal or smaller than the target stream top item"  # XADD's refusal of an old id


class OutputTimeout(TimeoutError):
    """No output arrived for a request within the timeout (no engine is consuming?)."""


class RequestProducer:
    """The API's side: enqueue a request, stream its outputs back, cancel it."""

    def __init__(self, client: aredis.Redis, service: str):
        self.client, self.service = client, service
        self.stream = protocol.request_stream(service)

    async def depth(self) -> int:
        """Requests queued or in progress (engines delete an entry once it is done)."""
        return await self.client.xlen(self.stream)

    async def submit(self, request: InferenceRequest) -> None:
        """Returns once the request is stored in Redis."""
        await self.client.xadd(self.stream, {"data": request.to_json()})

    async def outputs(self, request_id: str, timeout_s: float) -> AsyncIterator[OutputChunk]:
        """The request's chunks in order, up to the finished one; deletes the output stream after. While
        Redis is unreachable it keeps trying (the engines resume once it is back) until ``timeout_s``."""
        key, last_id = protocol.output_stream(self.service, request_id), "0"
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                wait_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
                try:
                    reply = await self.client.xread({key: last_id}, block=max(min(wait_ms, BLOCK_MS), 1),
                                                    count=256)
                except TRANSIENT_ERRORS:
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(RETRY_S)
                    continue
                if not reply:
                    if time.monotonic() >= deadline:
                        raise OutputTimeout(f"no output for request {request_id} within {timeout_s:.0f} s")
                    continue
                for entry_id, fields in reply[0][1]:
                    last_id = entry_id
                    chunk = OutputChunk.from_json(fields["data"])
                    yield chunk
                    if chunk.finished:
                        return
                deadline = time.monotonic() + timeout_s
        finally:
            with contextlib.suppress(*TRANSIENT_ERRORS):  # it expires anyway (OUTPUT_TTL_S)
                await self.client.delete(key)

    async def cancel(self, request_id: str) -> None:
        await self.client.set(protocol.request_cancel_flag(self.service, request_id), "1",
                              ex=protocol.OUTPUT_TTL_S)


@dataclass
class ClaimedRequest:
    entry_id: str
    request: InferenceRequest
    reclaimed: bool  # taken over from a consumer that stopped answering


class RequestConsumer:
    """An engine's side: claim requests (new or reclaimed), push output chunks, acknowledge.

    A reclaimed entry delivered more than ``max_deliveries`` times, or one that cannot be read, is
    dead-lettered and its client answered with an error chunk instead (``protocol``, Delivery)."""

    def __init__(self, client: redis.Redis, service: str, consumer: str, reclaim_idle_ms: int = 30_000,
                 max_deliveries: int = protocol.MAX_DELIVERIES):
        self.client, self.service, self.consumer = client, service, consumer
        self.stream = protocol.request_stream(service)
        self.reclaim_idle_ms, self.max_deliveries = reclaim_idle_ms, max_deliveries
        self._reclaim_cursor = "0-0"
        self._next_reclaim = 0.0

    def ensure_group(self) -> None:
        ensure_group(self.client, self.stream)

    def claim(self, count: int, block_ms: int, held: list[str] | None = None) -> list[ClaimedRequest]:
        """Up to ``count`` requests: first those pending on dead consumers, then new ones. ``held``: the
        entries this consumer works on, refreshed before a reclaim scan so it never takes its own."""
        if count <= 0:
            return []
        try:
            claimed = self._reclaim(count, held or [])
            if len(claimed) < count:
                block = block_ms if not claimed and block_ms > 0 else None
                reply = self.client.xreadgroup(protocol.ENGINE_GROUP, self.consumer, {self.stream: ">"},
                                               count=count - len(claimed), block=block)
                claimed += self._readable([(eid, f, False) for _, entries in reply or [] for eid, f in entries])
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self.ensure_group()  # Redis came back empty (no persistence): start over
            return []
        return claimed

    def _reclaim(self, count: int, held: list[str]) -> list[ClaimedRequest]:
        """Entries idle for ``reclaim_idle_ms`` on any consumer (checked every quarter of that time)."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        self.heartbeat(held)  # e.g. after an outage: ours are idle too, and a reclaim counts as a delivery
        cursor, entries, _deleted = self.client.xautoclaim(
            self.stream, protocol.ENGINE_GROUP, self.consumer, self.reclaim_idle_ms,
            start_id=self._reclaim_cursor, count=count)
        self._reclaim_cursor = cursor
        if cursor == "0-0":  # scanned the whole pending list: wait before the next scan
            self._next_reclaim = now + self.reclaim_idle_ms / 4000
        return self._readable([(eid, f, True) for eid, f in entries if f])

    def _readable(self, entries: list[tuple[str, dict[str, str], bool]]) -> list[ClaimedRequest]:
        """The entries that can be processed; unreadable and poison ones are dead-lettered here."""
        claimed = []
        for entry_id, fields, reclaimed in entries:
            delivered = deliveries(self.client, self.stream, entry_id) if reclaimed else 1
            try:
                request = InferenceRequest.from_json(fields["data"])
            except (KeyError, TypeError, ValueError) as error:
                dead_letter(self.client, self.service, self.stream, entry_id, fields.get("data"),
                            f"unreadable request entry: {error}", delivered)
                continue
            if delivered > self.max_deliveries:
                error = poison_error("request", delivered)
                self.push([(request.request_id, None, OutputChunk.failure(500, "InternalServerError", error))])
                dead_letter(self.client, self.service, self.stream, entry_id, fields["data"], error, delivered)
                continue
            claimed.append(ClaimedRequest(entry_id, request, reclaimed))
        return claimed

    def heartbeat(self, entry_ids: list[str]) -> None:
        """Reset the idle time of requests this consumer still works on, so nobody reclaims them."""
        if entry_ids:
            self.client.xclaim(self.stream, protocol.ENGINE_GROUP, self.consumer, 0, entry_ids, justid=True)

    def hand_back(self, entry_ids: list[str]) -> None:
        """Give up requests this consumer holds: another engine reclaims them at once (see ``emitted``)."""
        hand_back(self.client, self.stream, self.consumer, entry_ids)

    def emitted(self, request_id: str) -> list[OutputChunk]:
        """Chunks already streamed for a request (by a consumer that died)."""
        entries = self.client.xrange(protocol.output_stream(self.service, request_id))
        return [OutputChunk.from_json(fields["data"]) for _, fields in entries]

    def push(self, chunks: list[tuple[str, int | None, OutputChunk]]) -> None:
        """Append ``(request id, chunk number, chunk)`` to the output streams in one round trip.

        Chunk number ``n`` is entry id ``n+1-0``, so a push retried after a lost connection is
        idempotent: Redis refuses a chunk it already holds and it is skipped here. ``None`` (a final
        error chunk) appends after whatever is there."""
        pipe = self.client.pipeline(transaction=False)
        for request_id, number, chunk in chunks:
            key = protocol.output_stream(self.service, request_id)
            pipe.xadd(key, {"data": chunk.to_json()}, id="*" if number is None else f"{number + 1}-0")
            pipe.expire(key, protocol.OUTPUT_TTL_S)
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, redis.ResponseError) and ALREADY_PUSHED not in str(reply):
                raise reply

    def complete(self, entry_ids: list[str]) -> None:
        """Acknowledge and delete finished requests (call only once their final chunk is pushed)."""
        if entry_ids:
            pipe = self.client.pipeline(transaction=False)
            pipe.xack(self.stream, protocol.ENGINE_GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            pipe.execute()

    def cancelled(self, request_ids: list[str]) -> list[str]:
        """The requests among ``request_ids`` whose client went away."""
        if not request_ids:
            return []
        flags = self.client.mget([protocol.request_cancel_flag(self.service, rid) for rid in request_ids])
        return [rid for rid, flag in zip(request_ids, flags, strict=True) if flag]
