"""FinetuneJobs on a serving replica: accepted from the job stream, trained inside the co-serving
iterations, their progress, versions and end written back to Redis for the operator.

A job's runner (its dataset read and counted, its LoRA weights and optimizer made, a checkpoint
loaded) is built on a worker thread, off the engine loop, and joins the co-serving engine once ready;
a build that fails fails that job. A job's stream entry stays pending (and is kept alive by
heartbeats) until the job ends, so if this replica dies another one reclaims it and resumes from the
job's latest published version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from flexllm.worker.adapters.publisher import AdapterPublisher
from flexllm.worker.coserve.engine import CoServingEngine, IterationResult
from flexllm.worker.finetune.runner import FinetuneRunner
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.metrics import Metrics
from flexllm.worker.queue.intake import JobIntake
from flexllm.worker.queue.jobs import JobQueue, JobSubmission

log = logging.getLogger(__name__)
CHECK_EVERY_S = 1.0


class CoServingJobs:
    """The ``JobHandler`` of this replica's job intake: builds accepted jobs' runners off the engine
    thread, trains them in the co-serving engine, reports their progress and ends them."""

    def __init__(self, queue: JobQueue, coserve: CoServingEngine, publisher: AdapterPublisher, consumer: str,
                 parse_spec: Callable[[dict[str, Any]], Any], metrics: Metrics | None = None,
                 data_roots: Sequence[Path] = (), reclaim_idle_ms: int = 60_000):
        self.queue, self.coserve, self.publisher, self.consumer = queue, coserve, publisher, consumer
        self.metrics, self.data_roots = metrics, data_roots  # datasets only from under these (none: no dataset)
        self.intake = JobIntake(queue, consumer, self, parse_spec, reclaim_idle_ms)
        self.entries: dict[str, str] = {}  # job -> its pending stream entry (building or training)
        self.builds: dict[str, Future[FinetuneRunner]] = {}  # job -> its runner being built
        self.builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-build")
        self.draining = False  # a job is handed back once it finishes its current step
        self._next_check = 0.0

    def poll(self) -> None:
        """Take new job entries (their runners start building) and start training the built ones."""
        self.intake.poll()
        for name, build in list(self.builds.items()):
            if build.done():
                del self.builds[name]
                self._start(name, build)

    def accept(self, job: JobSubmission, spec: FinetuneJobSpec, entry_id: str) -> bool:
        self.entries[job.name] = entry_id
        self.builds[job.name] = self.builder.submit(self._build, job, spec)
        return True

    def _build(self, job: JobSubmission, spec: FinetuneJobSpec) -> FinetuneRunner:
        """On the builder thread. Only a job taken over from a dead replica resumes: a new job of a reused
        name starts afresh."""
        engine = self.coserve.engine
        return FinetuneRunner(engine.model, engine.tokenizer, spec, self.publisher.store.root, job.name,
                              base_model=str(engine.model_path), data_roots=self.data_roots,
                              resume=job.reclaimed, publish=self._publisher(job.name, spec))

    def _start(self, name: str, build: Future[FinetuneRunner]) -> None:
        try:
            runner = build.result()
        except Exception as error:  # a bad dataset or checkpoint: the job fails, not the worker
            log.error("job %s failed to start", name, exc_info=error)
            self._end(name, self.entries.pop(name), "Failed", str(error))
            return
        self.coserve.add_job(name, runner)
        self._report(name, runner, "Running", "resumed" if runner.step else "started")

    def _publisher(self, adapter: str, spec: FinetuneJobSpec):
        def publish(write, step: int, loss: float) -> int:
            return self.publisher.publish(adapter, write, step, loss, spec.publish.keep_versions).version
        return publish

    def held_entries(self) -> list[str]:
        return list(self.entries.values())

    def record(self, result: IterationResult) -> None:
        """After a co-serving iteration: progress for every job that finished a step; failed, finished,
        cancelled and (draining) held jobs end or are handed back; heartbeats for the entries held."""
        for name, work in result.finetune.items():
            if self.metrics is not None:
                self.metrics.tokens.labels("finetune").inc(work.trained_tokens)
            job = self.coserve.jobs.get(name)  # None: it failed in this iteration
            if work.steps_finished and job is not None:
                self._report(name, job.runner, "Running")
        for name, error in self.coserve.failed.items():
            self.coserve.remove_job(name)
            self._end(name, self.entries.pop(name, None), "Failed", error)
        self.coserve.failed.clear()
        for name, job in list(self.coserve.jobs.items()):
            if job.runner.done:
                self.coserve.remove_job(name)
                self._report(name, job.runner, "Succeeded", "finished")
                self._end(name, self.entries.pop(name), None)
        if self.draining:
            self._hand_back_held()
        if time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + CHECK_EVERY_S
            self._check_cancelled()
            self.queue.heartbeat(self.consumer, list(self.entries.values()))

    def drain(self) -> None:
        """Stopping: each job finishes its current step, starts no other, and is then handed back (one
        still being built at once)."""
        self.draining = True
        for job in self.coserve.jobs.values():
            job.runner.hold_at_step_boundary = True
        self._hand_back_held()

    def _hand_back_held(self) -> None:
        """Hand back the jobs at a step boundary, their steps since the latest version published first."""
        for name in list(self.builds):
            self._hand_back(name, checkpoint=False)
        for name, job in list(self.coserve.jobs.items()):
            if job.runner.at_step_boundary and name in self.entries:
                latest = self.queue.latest_version(name)
                self._hand_back(name, checkpoint=job.runner.step > (latest.step if latest else 0))

    def hand_back(self) -> None:
        """Hand back the jobs still here (mid-step: the partial step is lost, they resume from their latest
        version); builds not started are dropped, one under way ends on its own."""
        for name in list(self.entries):
            self._hand_back(name, checkpoint=False)
        self.builder.shutdown(wait=False, cancel_futures=True)

    def _hand_back(self, name: str, checkpoint: bool) -> None:
        """Leave a job to another replica, which resumes it from its latest version; ``checkpoint``
        publishes the runner's state as that version first (only at a step boundary)."""
        runner = self._forget(name)
        if checkpoint and runner is not None:
            runner.publish()
            self._report(name, runner, "Running")
        latest = self.queue.latest_version(name)
        resume = f"v{latest.version} (step {latest.step})" if latest else "the start"
        self.queue.set_progress(name, phase="Queued", message=f"handed back by {self.consumer}: resumes from {resume}")
        self.queue.hand_back(self.consumer, [self.entries.pop(name)])
        log.info("job %s handed back: resumes from %s", name, resume)

    def _check_cancelled(self) -> None:
        for name in list(self.entries):
            cancel = self.queue.cancellation(name)
            if cancel is not None:
                self._forget(name)
                self._end(name, self.entries.pop(name), "Cancelled", cancel.reason)

    def _forget(self, name: str) -> FinetuneRunner | None:
        """Take a job out of training, or drop its build (its runner, if being built, is discarded)."""
        build = self.builds.pop(name, None)
        if build is not None:
            build.cancel()
        return self.coserve.remove_job(name)

    def _report(self, name: str, runner: FinetuneRunner, phase: str, message: str | None = None) -> None:
        self.queue.write_progress(name, replace(runner.progress, phase=phase, message=message))

    def _end(self, name: str, entry_id: str | None, phase: str | None, message: str | None = None) -> None:
        if phase is not None:
            self.queue.set_progress(name, phase=phase, message=message)
            log.info("job %s %s: %s", name, phase.lower(), message)
        if entry_id is not None:
            self.queue.ack(entry_id)
