"""The serving loop: Redis request stream -> co-serving step -> per-request output streams.

One ``ServingLoop`` per engine (replica); it owns the iteration. ``run_once`` is one: take new jobs
(``coserve.jobs``) and requests, then one ``CoServingEngine.step`` that fuses the jobs' fine-tuning
work into the inference forward, then stream what it produced and record what the jobs did.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from flexllm.worker.adapters.publisher import AdapterPublisher
from flexllm.worker.adapters.registry import AdapterRegistry
from flexllm.worker.adapters.store import AdapterStore
from flexllm.worker.adapters.sync import AdapterSync
from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.coserve.jobs import CoServingJobs
from flexllm.worker.engine.config import EngineConfig
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.engine.lora import UnknownAdapterError
from flexllm.worker.engine.outputs import RequestOutput
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.metrics import Metrics
from flexllm.worker.options import WorkerOptions
from flexllm.worker.queue.connection import TRANSIENT_ERRORS, connect, with_backoff
from flexllm.worker.queue.jobs import JobQueue
from flexllm.worker.queue.messages import OutputChunk, TokenLogprob
from flexllm.worker.queue.requests import ClaimedRequest, RequestConsumer

log = logging.getLogger(__name__)


@dataclass
class ActiveRequest:
    entry_id: str
    prompt_tokens: int  # of the original prompt
    resumed_tokens: int  # output tokens streamed by a previous consumer before it died
    want_logprobs: bool
    chunks: int  # output chunks queued so far (by this consumer and any before it): the next one's number
    prefilled: bool = False


class EngineBroken(RuntimeError):
    """The loop cannot go on: iterations keep failing, or Redis stayed away too long. The process exits
    (non-zero) so that its supervisor restarts it; its pending requests and jobs are reclaimed."""


class ServingLoop:
    """Claims requests, steps the engine, streams outputs, acknowledges only what is durable.

    An error caused by one request fails that request (an error chunk) and the loop goes on; an
    iteration that fails as a whole fails the requests in the engine. ``max_failures`` failed
    iterations in a row, or Redis unreachable for ``redis_outage_s``, raise ``EngineBroken``."""

    def __init__(self, coserve: CoServingEngine, requests: RequestConsumer, adapters: AdapterSync | None = None,
                 jobs: CoServingJobs | None = None, metrics: Metrics | None = None, idle_block_ms: int = 100,
                 housekeeping_s: float = 0.25, max_failures: int = 3, redis_outage_s: float = 30.0):
        self.coserve, self.engine = coserve, coserve.engine
        self.requests, self.adapters, self.jobs = requests, adapters, jobs
        self.metrics = metrics
        self.idle_block_ms, self.housekeeping_s = idle_block_ms, housekeeping_s
        self.max_failures, self.redis_outage_s = max_failures, redis_outage_s
        self.failures = 0  # iterations failed in a row
        self.redis_lost_at: float | None = None  # monotonic time of the first failed call of an outage
        self.active: dict[str, ActiveRequest] = {}
        self.outbox: list[tuple[str, int | None, OutputChunk]] = []  # not yet in Redis (kept across outages)
        self.done: list[str] = []  # entry ids to acknowledge once the outbox is flushed
        self._next_housekeeping = 0.0

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event, drain_s: float = 30.0) -> None:
        """Iterate until ``stop``; then drain (``drain``) for up to ``drain_s``."""
        self.requests.ensure_group()
        if self.jobs is not None:
            self.jobs.queue.ensure_group()
        delay = 0.5
        while not stop.is_set():
            delay = self._guarded(self.run_once, delay, stop)
        self.drain(drain_s)

    def drain(self, drain_s: float) -> None:
        """Take nothing new; for up to ``drain_s`` finish the requests in flight and let each job finish its
        current step (it is then checkpointed as a version and handed back); hand back whatever is left.

        Handed back = left pending in the stream, idle, so another engine reclaims it at once: a request
        resumes after the tokens already streamed, a job from its latest version.
        """
        deadline = time.monotonic() + drain_s
        try:
            if self.jobs is not None:
                self.jobs.drain()
            while (self.active or self.outbox or self.coserve.has_work()) and time.monotonic() < deadline:
                self.drain_once()
            self.hand_back()
            if self.jobs is not None:
                self.jobs.hand_back()
        except TRANSIENT_ERRORS as error:  # what is in flight stays pending: reclaimed after the idle time
            log.error("Redis unreachable while draining (%s): in-flight work is left for reclaim", error)

    def _guarded(self, iteration, delay: float, stop: threading.Event) -> float:
        """Run one iteration; back off while Redis is away; raise ``EngineBroken`` past the bounds."""
        try:
            iteration()
        except TRANSIENT_ERRORS as error:
            now = time.monotonic()
            self.redis_lost_at = self.redis_lost_at or now
            if now - self.redis_lost_at > self.redis_outage_s:
                raise EngineBroken(f"Redis unreachable for more than {self.redis_outage_s:.0f} s: {error}") from error
            log.error("Redis unreachable: %s; retrying in %.1f s", error, delay)
            stop.wait(delay)
            return min(delay * 2, 5.0)
        except Exception as error:
            self.failures += 1
            log.exception("engine iteration failed (%d in a row)", self.failures)
            if self.failures >= self.max_failures:
                raise EngineBroken(f"{self.failures} engine iterations failed in a row; last: "
                                   f"{type(error).__name__}: {error}") from error
            stop.wait(delay)
            return min(delay * 2, 5.0)
        self.failures, self.redis_lost_at = 0, None
        return 0.5

    def run_once(self) -> list[RequestOutput]:
        """One iteration: flush, hot-load adapters, take jobs and requests, step, stream, acknowledge."""
        self.flush()
        if self.adapters is not None:
            self.adapters.reconcile()
        if self.jobs is not None:
            self.jobs.poll()
        busy = self.coserve.has_work()
        held = [a.entry_id for a in self.active.values()]
        for claimed in self.requests.claim(self.engine.config.max_num_seqs - len(self.active),
                                           0 if busy else self.idle_block_ms, held):
            self.start(claimed)
        self._housekeeping()
        return self._step_and_flush()

    def drain_once(self) -> list[RequestOutput]:
        self.flush()
        return self._step_and_flush()

    def _step_and_flush(self) -> list[RequestOutput]:
        try:
            outputs = self.engine_step()
        except TRANSIENT_ERRORS:
            raise
        except Exception as error:  # nothing to pin it on: the requests in the engine fail, the loop counts it
            self.engine.fail_all(error)
            message = f"the engine iteration failed: {type(error).__name__}: {error}"
            for rid, active in self.active.items():
                self.outbox.append((rid, active.chunks, OutputChunk.failure(500, "InternalServerError", message)))
                self.done.append(active.entry_id)
            self.active.clear()
            self.flush()
            raise
        self.collect(outputs)
        self.flush()
        return outputs

    def engine_step(self) -> list[RequestOutput]:
        """One co-serving iteration; the jobs then record what they did in it."""
        result = self.coserve.step()
        if self.jobs is not None:
            self.jobs.record(result)
        if result.outputs and self.metrics is not None:
            self.metrics.engine_steps.inc()
        return result.outputs

    # -- requests ---------------------------------------------------------------------------
    def start(self, claimed: ClaimedRequest) -> None:
        """Add a claimed request to the engine; a reclaimed one resumes after what was streamed."""
        request, rid = claimed.request, claimed.request.request_id
        if rid in self.active:
            return
        resumed: list[int] = []
        emitted: list[OutputChunk] = []
        if claimed.reclaimed:
            emitted = self.requests.emitted(rid)
            if emitted and emitted[-1].finished:  # its consumer died between the last chunk and the ack
                self.done.append(claimed.entry_id)
                return
            resumed = [t for chunk in emitted for t in chunk.token_ids]
            log.info("resuming request %s after %d streamed tokens", rid, len(resumed))
        try:
            params = SamplingParams(**request.params)
            if resumed:
                params = replace(params, max_tokens=params.max_tokens - len(resumed))
            if request.lora is not None and self.adapters is not None:
                self.adapters.ensure(request.lora)
            self.engine.add_request(rid, request.prompt_token_ids + resumed, params, request.lora)
        except UnknownAdapterError as error:
            self._fail(claimed.entry_id, rid, OutputChunk.failure(404, "NotFoundError", str(error)))
        except (ValueError, TypeError) as error:
            self._fail(claimed.entry_id, rid, OutputChunk.failure(400, "BadRequestError", str(error)))
        except TRANSIENT_ERRORS:
            raise
        except Exception as error:  # e.g. its adapter failed to load: this request fails, not the loop
            log.exception("request %s failed to start", rid)
            self._fail(claimed.entry_id, rid, OutputChunk.failure(500, "InternalServerError",
                                                                  f"{type(error).__name__}: {error}"))
        else:
            self.active[rid] = ActiveRequest(claimed.entry_id, len(request.prompt_token_ids), len(resumed),
                                             params.logprobs is not None, len(emitted))

    def hand_back(self) -> None:
        """Abort the requests in flight and leave them to another engine, which resumes each one after
        the tokens this one streamed (flushed first)."""
        self.flush()
        entries = []
        for rid, active in self.active.items():
            self.engine.abort(rid)
            entries.append(active.entry_id)
        self.active.clear()
        self.requests.hand_back(entries)
        if entries:
            log.info("handed back %d unfinished requests", len(entries))

    def _fail(self, entry_id: str, request_id: str, chunk: OutputChunk) -> None:
        self.outbox.append((request_id, None, chunk))
        self.done.append(entry_id)

    def collect(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            active = self.active.get(out.request_id)
            if active is None:
                continue
            if out.error is not None:
                chunk = OutputChunk.failure(500, "InternalServerError", f"the request failed: {out.error}")
            else:
                chunk = output_chunk(out, active)
            self.outbox.append((out.request_id, active.chunks, chunk))
            active.chunks += 1
            if self.metrics is not None:
                if not active.prefilled:
                    self.metrics.tokens.labels("prompt").inc(out.num_prompt_tokens)
                self.metrics.tokens.labels("generation").inc(len(out.delta_token_ids))
            active.prefilled = True
            if out.finished:
                self.done.append(active.entry_id)
                del self.active[out.request_id]
        if self.metrics is not None:
            self.metrics.running.set(len(self.active))

    def flush(self) -> None:
        """Push pending chunks, then acknowledge the requests whose last chunk is now in Redis."""
        if self.outbox:
            self.requests.push(self.outbox)
            self.outbox = []
        if self.done:
            self.requests.complete(self.done)
            self.done = []

    def _housekeeping(self) -> None:
        """Every ``housekeeping_s``: abort requests whose client left; keep our pending entries alive."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.housekeeping_s
        for rid in self.requests.cancelled(list(self.active)):
            self.engine.abort(rid)
            self.done.append(self.active.pop(rid).entry_id)
            log.info("request %s aborted: the client went away", rid)
        self.requests.heartbeat([a.entry_id for a in self.active.values()])


def output_chunk(out: RequestOutput, active: ActiveRequest) -> OutputChunk:
    """An engine output -> the request's next chunk (its tokens counted after those an earlier, dead
    consumer streamed)."""
    logprobs = None
    if active.want_logprobs:
        new = out.logprobs[len(out.token_ids) - len(out.delta_token_ids):]
        logprobs = [TokenLogprob(t.token_id, t.logprob, t.top_logprobs) for t in new]
    return OutputChunk(text=out.delta_text, token_ids=list(out.delta_token_ids), logprobs=logprobs,
                       finished=out.finished, finish_reason=out.finish_reason, prompt_tokens=active.prompt_tokens,
                       completion_tokens=active.resumed_tokens + len(out.token_ids))


class EngineWorker:
    """Loads the engine, wires it to Redis (requests, jobs, adapters) and runs its ``ServingLoop``,
    whose iterations are co-serving steps: inference plus the fine-tuning jobs this replica took."""

    def __init__(self, engine_config: EngineConfig, options: WorkerOptions, metrics: Metrics,
                 parse_spec: Callable[[dict], object], on_ready: Callable[[LLMEngine], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None):
        self.engine_config, self.options, self.metrics = engine_config, options, metrics
        self.parse_spec, self.on_ready, self.on_failure = parse_spec, on_ready, on_failure
        self.failed: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        opts = self.options
        client = connect(opts.redis_url)
        with_backoff(client.ping, "engine loop start", opts.redis_url)
        engine = LLMEngine(self.engine_config)
        self.metrics.prefix_cache.block_manager = engine.block_manager
        consumer = f"{opts.replica}-{os.getpid()}"
        adapters = AdapterSync(client, opts.service, opts.replica, engine)
        store = AdapterStore(opts.adapter_dir or tempfile.mkdtemp(prefix="flexllm-adapters-"))
        registry = AdapterRegistry(client, opts.service)
        for name, folder in opts.pinned_adapters.items():
            if not store.versions(name):
                store.publish_folder(name, folder)
        registry.sync_from_store(store)
        coserve = CoServingEngine(engine, opts.slo, opts.policy, opts.max_finetune_tokens)
        coserve.profile()
        queue = JobQueue(client, opts.service, opts.max_deliveries)
        jobs = CoServingJobs(queue, coserve, AdapterPublisher(store, registry), consumer, self.parse_spec,
                             self.metrics, [Path(d).resolve() for d in opts.data_dirs], opts.reclaim_idle_ms)
        requests = RequestConsumer(client, opts.service, consumer, opts.reclaim_idle_ms, opts.max_deliveries)
        loop = ServingLoop(coserve, requests, adapters, jobs, self.metrics, redis_outage_s=opts.redis_outage_s)
        adapters.start()
        log.info("engine loop %s serving %s (service %s)", consumer, engine.model_path, opts.service)
        if self.on_ready is not None:
            self.on_ready(engine)
        try:
            loop.run(stop, opts.drain_s)
        finally:
            adapters.stop()
            client.close()

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        """Run in a thread (``flexllm serve``); a crash is logged and kept in ``failed``."""

        def target() -> None:
            try:
                self.run(stop)
            except BaseException as error:
                self.failed = error
                log.exception("the engine loop stopped")
                if self.on_failure is not None:
                    self.on_failure(error)
                raise

        thread = threading.Thread(target=target, name="engine-loop", daemon=True)
        thread.start()
        return thread
