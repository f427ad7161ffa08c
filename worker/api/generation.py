"""One request's round trip through Redis: submit, stream chunks back, record latency, cancel on exit."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from flexllm.worker.api.errors import APIError
from flexllm.worker.metrics import Metrics
from flexllm.worker.queue.connection import TRANSIENT_ERRORS
from flexllm.worker.queue.messages import InferenceRequest, OutputChunk
from flexllm.worker.queue.requests import OutputTimeout, RequestProducer

RETRY_AFTER_S = 1  # what a 429 asks its client to wait: the queue drains at the engines' pace


class Generation:
    """``await start()`` enqueues and waits for the first chunk (errors surface as ``APIError`` before
    any response is sent); then ``chunks()`` yields it and the rest. A request left unfinished (client
    gone) is cancelled so the engine aborts it."""

    def __init__(self, producer: RequestProducer, request: InferenceRequest, metrics: Metrics,
                 max_queued: int, timeout_s: float):
        self.producer, self.request, self.metrics = producer, request, metrics
        self.max_queued, self.timeout_s = max_queued, timeout_s
        self.first: OutputChunk | None = None
        self._stream: AsyncIterator[OutputChunk] | None = None
        self._finished = False

    async def start(self) -> None:
        arrival = time.monotonic()
        try:
            if not await self.producer.submit(self.request, self.max_queued):
                raise APIError(429, f"the request queue is full ({self.max_queued} requests); retry later",
                               code="queue_full", retry_after_s=RETRY_AFTER_S)
            self._stream = self._timed(arrival)
            self.first = await anext(self._stream)
        except TRANSIENT_ERRORS as error:
            raise APIError(503, f"the request queue (Redis) is unreachable: {error}") from error
        except OutputTimeout as error:
            await self.aclose()
            raise APIError(504, str(error)) from error
        if self.first.error is not None:
            error = self.first.error
            raise APIError(error["status"], error["message"], kind=error["type"])

    async def _timed(self, arrival: float) -> AsyncIterator[OutputChunk]:
        first_token = last = None
        async for chunk in self.producer.outputs(self.request.request_id, self.timeout_s):
            last = chunk
            if first_token is None and chunk.token_ids:
                first_token = time.monotonic()
            if chunk.finished:
                self._finished = True
            yield chunk
        if last is not None and last.error is None and first_token is not None:
            now = time.monotonic()
            tpot = (now - first_token) / (last.completion_tokens - 1) if last.completion_tokens > 1 else None
            self.metrics.observe_request(first_token - arrival, tpot, now - arrival)

    async def chunks(self) -> AsyncIterator[OutputChunk]:
        """All chunks, the first one included, up to the finished one."""
        assert self.first is not None and self._stream is not None, "call start() first"
        yield self.first
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        if not self._finished:
            await self.producer.cancel(self.request.request_id)
