"""FinetuneJobs on a serving replica: accepted from the job stream, trained inside the co-serving
iterations, their progress, versions and end written back to Redis for the operator.

A job's stream entry stays pending (and is kept alive by heartbeats) until the job ends, so if this
replica dies another one reclaims it and resumes from the job's latest published version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from flexllm.worker.adapters.publisher import AdapterPublisher
from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.engine.outputs import RequestOutput
from flexllm.worker.finetune.runner import FinetuneRunner
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.metrics import Metrics
from flexllm.worker.queue.jobs import JobQueue, JobSubmission

log = logging.getLogger(__name__)
CHECK_EVERY_S = 1.0


class CoServingJobs:
    """The ``JobHandler`` that trains accepted jobs in the co-serving loop."""

    def __init__(self, queue: JobQueue, coserve: CoServingEngine, publisher: AdapterPublisher, consumer: str,
                 metrics: Metrics | None = None, data_roots: Sequence[Path] = ()):
        self.queue, self.coserve, self.publisher, self.consumer = queue, coserve, publisher, consumer
        self.metrics, self.data_roots = metrics, data_roots  # datasets only from under these (none: no dataset)
        self.entries: dict[str, str] = {}  # job -> its pending stream entry
        self.draining = False  # a job is handed back once it finishes its current step
        self._next_check = 0.0

    def accept(self, job: JobSubmission, spec: FinetuneJobSpec, entry_id: str) -> bool:
        engine = self.coserve.engine
        try:
            # Only a job taken over from a dead replica resumes: a new job of a reused name starts afresh.
            runner = FinetuneRunner(engine.model, engine.tokenizer, spec, self.publisher.store.root, job.name,
                                    base_model=str(engine.model_path), data_roots=self.data_roots,
                                    resume=job.reclaimed, publish=self._publisher(job.name, spec))
        except Exception as error:  # a bad dataset or checkpoint: the job fails, not the worker
            log.exception("job %s failed to start", job.name)
            self.queue.set_progress(job.name, phase="Failed", message=str(error))
            return False
        self.coserve.add_job(job.name, runner)
        self.entries[job.name] = entry_id
        self._report(job.name, runner, "Running", "resumed" if runner.step else "started")
        return True

    def _publisher(self, adapter: str, spec: FinetuneJobSpec):
        def publish(write, step: int, loss: float) -> int:
            return self.publisher.publish(adapter, write, step, loss, spec.publish.keep_versions).version
        return publish

    def held_entries(self) -> list[str]:
        return list(self.entries.values())

    def has_work(self) -> bool:
        return bool(self.coserve.active_jobs())

    def step(self) -> list[RequestOutput]:
        """One co-serving iteration; then progress for every job that finished a step."""
        result = self.coserve.step()
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
        return result.outputs

    def drain(self) -> None:
        """Stopping: each job finishes its current step, starts no other, and is then handed back."""
        self.draining = True
        for job in self.coserve.jobs.values():
            job.runner.hold_at_step_boundary = True
        self._hand_back_held()

    def _hand_back_held(self) -> None:
        """Hand back the jobs at a step boundary, their steps since the latest version published first."""
        for name, job in list(self.coserve.jobs.items()):
            if job.runner.at_step_boundary and name in self.entries:
                latest = self.queue.latest_version(name)
                self._hand_back(name, checkpoint=job.runner.step > (latest.step if latest else 0))

    def hand_back(self) -> None:
        """Hand back the jobs still here (mid-step: the partial step is lost, they resume from their latest
        version)."""
        for name in list(self.entries):
            self._hand_back(name, checkpoint=False)

    def _hand_back(self, name: str, checkpoint: bool) -> None:
        """Leave a job to another replica, which resumes it from its latest version; ``checkpoint``
        publishes the runner's state as that version first (only at a step boundary)."""
        runner = self.coserve.remove_job(name)
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
                self.coserve.remove_job(name)
                self._end(name, self.entries.pop(name), "Cancelled", cancel.reason)

    def _report(self, name: str, runner: FinetuneRunner, phase: str, message: str | None = None) -> None:
        self.queue.write_progress(name, replace(runner.progress, phase=phase, message=message))

    def _end(self, name: str, entry_id: str | None, phase: str | None, message: str | None = None) -> None:
        if phase is not None:
            self.queue.set_progress(name, phase=phase, message=message)
            log.info("job %s %s: %s", name, phase.lower(), message)
        if entry_id is not None:
            self.queue.ack(entry_id)
