"""FinetuneJob intake on an engine loop: read the job stream, validate, hand jobs to a ``JobHandler``.

Queue-side only: no engine, co-serving or torch import (``flexllm.worker.coserve.jobs`` trains the jobs)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from flexllm.worker import protocol
from flexllm.worker.queue.connection import TRANSIENT_ERRORS
from flexllm.worker.queue.jobs import JobQueue, JobSubmission

log = logging.getLogger(__name__)


class JobHandler(Protocol):
    """Takes the valid jobs (``flexllm.worker.coserve.jobs.CoServingJobs`` trains them)."""

    def accept(self, job: JobSubmission, spec: Any, entry_id: str) -> bool:
        """Take a validated job; its stream entry ``entry_id`` is acknowledged when the job ends. False if
        the job failed to start (its progress says why): the caller acknowledges the entry."""

    def held_entries(self) -> list[str]:
        """The stream entries of the jobs it holds (preparing or training, not yet ended)."""


class JobIntake:
    """Consumes job entries; invalid or cancelled ones are finished here, valid ones go to ``handler``.

    A rejected entry is acknowledged once its outcome is in the job's progress hash; an accepted one
    stays pending until the handler ends the job, so a dead replica's jobs are reclaimed and resumed.
    """

    def __init__(self, queue: JobQueue, consumer: str, handler: JobHandler,
                 parse_spec: Callable[[dict[str, Any]], Any], reclaim_idle_ms: int = 60_000):
        self.queue, self.consumer, self.handler, self.parse_spec = queue, consumer, handler, parse_spec
        self.reclaim_idle_ms = reclaim_idle_ms

    def poll(self) -> int:
        """Process the new job entries; returns how many."""
        claimed = self.queue.claim(self.consumer, reclaim_idle_ms=self.reclaim_idle_ms,
                                   held=self.handler.held_entries())
        for entry_id, job in claimed:
            try:
                taken = self._take(job, entry_id)
            except TRANSIENT_ERRORS:
                raise
            except Exception as error:  # this job fails, the loop goes on
                log.exception("job %s failed at intake", job.name)
                self.queue.set_progress(job.name, phase="Failed", message=f"{type(error).__name__}: {error}")
                taken = False
            if not taken:
                self.queue.ack(entry_id)
        return len(claimed)

    def _take(self, job: JobSubmission, entry_id: str) -> bool:
        """True if the handler took the job (and with it the entry)."""
        if self.queue.is_cancelled(job.name):
            self.queue.set_progress(job.name, phase="Cancelled", message="cancelled before it started")
            return False
        if self.queue.progress(job.name).phase in protocol.TERMINAL_PHASES:
            return False  # reclaimed after its replica ended it but died before the acknowledgement
        try:
            spec = self.parse_spec(job.spec)
        except ValueError as error:  # pydantic.ValidationError is a ValueError
            self.queue.set_progress(job.name, phase="Failed", message=f"invalid spec: {error}")
            log.error("job %s rejected: %s", job.name, error)
            return False
        return self.handler.accept(job, spec, entry_id)
