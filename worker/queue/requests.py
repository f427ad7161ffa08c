"""The request stream (consumer group ``engines``) and the per-request output streams.

Delivery is at-least-once: an engine acknowledges (XACK + XDEL) a request only after its final chunk
is in Redis. A request left pending by a dead engine is reclaimed with XAUTOCLAIM by another one,
which resumes it after the tokens already streamed (see ``RequestConsumer.emitted``).

The stream holds the requests queued or in progress, so its length is the queue depth that
``RequestProducer.submit`` limits, atomically (one Lua script), across every API process of a service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis

from flexllm.worker import protocol
from flexllm.worker.queue.connection import TRANSIENT_ERRORS, ensure_group, hand_back
from flexllm.worker.queue.deadletter import screen
from flexllm.worker.queue.messages import InferenceRequest, OutputChunk

log = logging.getLogger(__name__)

BLOCK_MS = 2000  # longest blocking read: well under the client's socket timeout
ALREADY_PUSHED = "equal or smaller than the target stream top item"  # XADD's refusal of an old id
WAKE_TTL_S = 3600  # an API process's wake stream outlives it by at most this long
READ_RETRY_S = 0.5  # pause of the output reader after a failed read

# KEYS[1] the request stream; ARGV[1] the queue limit, ARGV[2] the request JSON.
# Returns the new entry id, or nil when the stream already holds ARGV[1] entries.
ADMIT_SCRIPT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'data', ARGV[2])
"""


class OutputTimeout(TimeoutError):
    """No output arrived for a request within the timeout (no engine is consuming?)."""


@dataclass
class _Waiter:
    last_id: str = "0"
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # chunk JSON, or the error of a failed read


class OutputReader:
    """Reads the output streams of every request this process waits on with one blocking XREAD on its
    own connection, so a waiting client pins no pooled connection. A request that starts waiting while
    the read blocks wakes it with an entry on this process's wake stream (read in the same XREAD)."""

    def __init__(self, reader: aredis.Redis, client: aredis.Redis, service: str):
        self.reader, self.client, self.service = reader, client, service  # reader: this task's connection
        self.wake_key = protocol.api_wake_stream(service, uuid.uuid4().hex)
        self._wake_id = "0"
        self._waiters: dict[str, _Waiter] = {}  # output stream key -> waiter
        self._changed = asyncio.Event()
        self._reading = self._woken = False
        self._task: asyncio.Task | None = None

    async def watch(self, request_id: str) -> asyncio.Queue:
        """Start reading ``request_id``'s outputs; its chunks (JSON) arrive on the returned queue."""
        waiter = self._waiters[protocol.output_stream(self.service, request_id)] = _Waiter()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="output-reader")
        self._changed.set()
        if self._reading and not self._woken:  # the running XREAD does not have this stream: wake it
            self._woken = True
            pipe = self.client.pipeline(transaction=False)
            await pipe.xadd(self.wake_key, {"w": "1"}, maxlen=1).expire(self.wake_key, WAKE_TTL_S).execute()
        return waiter.inbox

    def unwatch(self, request_id: str) -> None:
        self._waiters.pop(protocol.output_stream(self.service, request_id), None)

    async def _run(self) -> None:
        while True:
            if not self._waiters:
                self._changed.clear()
                await self._changed.wait()
                continue
            streams = {self.wake_key: self._wake_id} | {key: w.last_id for key, w in self._waiters.items()}
            self._reading, self._woken = True, False
            try:
                reply = await self.reader.xread(streams, block=BLOCK_MS, count=256)
            except Exception as error:
                self._reading = False
                log.error("reading output streams failed: %s", error)
                if not isinstance(error, TRANSIENT_ERRORS):  # Redis away: wait (each request has a timeout)
                    for waiter in self._waiters.values():  # anything else fails the waiting requests
                        waiter.inbox.put_nowait(error)
                await asyncio.sleep(READ_RETRY_S)
                continue
            self._reading = False
            for key, entries in reply or []:
                if key == self.wake_key:
                    self._wake_id = entries[-1][0]
                elif (waiter := self._waiters.get(key)) is not None:
                    waiter.last_id = entries[-1][0]
                    for _, fields in entries:
                        waiter.inbox.put_nowait(fields["data"])

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.reader.aclose()


class RequestProducer:
    """The API's side: admit a request against the queue limit, stream its outputs back, cancel it."""

    def __init__(self, client: aredis.Redis, reader: OutputReader, service: str):
        self.client, self.reader, self.service = client, reader, service
        self.stream = protocol.request_stream(service)
        self._admit = client.register_script(ADMIT_SCRIPT)

    async def submit(self, request: InferenceRequest, max_queued: int) -> bool:
        """Stores the request unless ``max_queued`` requests are already queued or in progress."""
        return await self._admit(keys=[self.stream], args=[max_queued, request.to_json()]) is not None

    async def outputs(self, request_id: str, timeout_s: float) -> AsyncIterator[OutputChunk]:
        """The request's chunks in order, up to the finished one; deletes the output stream after. While
        Redis is unreachable the reader keeps trying (the engines resume once it is back) up to ``timeout_s``."""
        inbox = await self.reader.watch(request_id)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(inbox.get(), timeout_s)
                except TimeoutError:
                    raise OutputTimeout(f"no output for request {request_id} within {timeout_s:.0f} s") from None
                if isinstance(item, Exception):
                    raise item
                chunk = OutputChunk.from_json(item)
                yield chunk
                if chunk.finished:
                    return
        finally:
            self.reader.unwatch(request_id)
            with contextlib.suppress(*TRANSIENT_ERRORS):  # it expires anyway (OUTPUT_TTL_S)
                await self.client.delete(protocol.output_stream(self.service, request_id))

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
        def answer(request: InferenceRequest, error: str) -> None:
            self.push([(request.request_id, None, OutputChunk.failure(500, "InternalServerError", error))])

        kept = screen(self.client, self.service, self.stream, entries, InferenceRequest.from_json, "request",
                      self.max_deliveries, answer)
        return [ClaimedRequest(entry_id, request, reclaimed) for entry_id, request, reclaimed in kept]

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
