"""FinetuneJob intake on an engine loop: read the job stream, validate, hand jobs to a ``JobHandler``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from flexllm.worker.queue.jobs import JobQueue, JobSubmission

log = logging.getLogger(__name__)


class JobHandler(Protocol):
    """Where fine-tuning plugs into the serving loop (the co-serving runner implements this)."""

    def accept(self, job: JobSubmission, spec: Any) -> None:
        """Take ownership of a validated job (its progress hash says Queued)."""

    def has_work(self) -> bool:
        """True while a job wants engine iterations (the loop then never blocks waiting for requests)."""

    def run_work(self) -> None:
        """Called once per serving iteration, right after the inference step."""


class QueueOnlyJobHandler:
    """Keeps accepted jobs Queued until a fine-tuning runner is attached (no training here)."""

    def __init__(self, queue: JobQueue):
        self.queue = queue
        self.accepted: list[JobSubmission] = []

    def accept(self, job: JobSubmission, spec: Any) -> None:
        self.accepted.append(job)
        self.queue.set_progress(job.name, phase="Queued", message="waiting for a fine-tuning runner")

    def has_work(self) -> bool:
        return False

    def run_work(self) -> None:
        return None


class JobIntake:
    """Consumes job entries; invalid or cancelled ones are finished here, valid ones go to ``handler``.

    An entry is acknowledged only after its outcome is written to the job's progress hash.
    """

    def __init__(self, queue: JobQueue, consumer: str, handler: JobHandler,
                 parse_spec: Callable[[dict[str, Any]], Any]):
        self.queue, self.consumer, self.handler, self.parse_spec = queue, consumer, handler, parse_spec

    def poll(self) -> int:
        """Process the new job entries; returns how many."""
        claimed = self.queue.claim(self.consumer)
        for entry_id, job in claimed:
            if job is not None:
                self._take(job)
            else:
                log.error("dropping unreadable job entry %s", entry_id)
            self.queue.ack(entry_id)
        return len(claimed)

    def _take(self, job: JobSubmission) -> None:
        if self.queue.is_cancelled(job.name):
            self.queue.set_progress(job.name, phase="Cancelled", message="cancelled before it started")
            return
        try:
            spec = self.parse_spec(job.spec)
        except ValueError as error:  # pydantic.ValidationError is a ValueError
            self.queue.set_progress(job.name, phase="Failed", message=f"invalid spec: {error}")
            log.error("job %s rejected: %s", job.name, error)
            return
        self.handler.accept(job, spec)
        log.info("job %s accepted", job.name)
