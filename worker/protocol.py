"""Redis key layout and message fields shared by the worker and the operator.

Every key of one InferenceService lives under ``flexllm:{service}:``; a FinetuneJob's
keys under ``flexllm:{service}:job:{job}``. Both sides import these helpers, so the
layout is written down exactly once.

- ``requests``            stream, consumer group ``engines``: inference requests (field ``data``, JSON)
- ``out:{request_id}``    stream: one entry per output chunk (field ``data``, JSON); expires after use
- ``jobs``                stream, consumer group ``engines``: FinetuneJob submissions (``data``: JSON
                          ``{"name", "namespace", "spec"}`` where ``spec`` is the CR's spec)
- ``job:{job}``           hash: progress (see ``PROGRESS_FIELDS``)
- ``job:{job}:cancel``    string ``"1"`` once the job is cancelled
- ``job:{job}:versions``  list of JSON adapter versions ``{"version", "step", "loss", "uri", "time"}``
- ``adapters``            pub/sub channel: JSON ``{"adapter", "version", "uri"}`` for every new version
- ``replica:{replica}``   hash with a TTL: what one replica really serves (``adapters``: JSON list of
                          ``name@vN``; ``ready``; ``updated``; ``failed``: JSON ``{"name@vN": error}``
                          of hot-loads that failed, cleared on success) — the source of
                          ``status.loadedAdapters`` and the ``AdaptersLoaded`` condition
- ``cancel:{request_id}`` string ``"1"`` once a client went away: the engine aborts the request
- ``adapter-versions``    hash ``name@vN`` -> JSON version: what may be served
- ``dead-letter``         stream: poison entries taken out of ``requests`` or ``jobs`` (fields ``stream``,
                          ``entry``, ``data`` — the original entry's —, ``error``, ``deliveries``, ``time``)

Names. ``{service}`` and ``{job}`` follow ``flexllm.worker.names`` (DNS-1123: lowercase letters, digits,
``-``, ``.``; never ``:``), so no valid name can reach into another key's layout (job ``x:cancel`` would
be job ``x``'s cancel flag). Every entrance checks names — the API (``model``), ``flexllm submit``, the
operator's handlers and the worker's job intake; an entry whose name breaks the rule is dead-lettered
without touching any key built from that name.

Delivery. Both streams are at-least-once: an entry stays pending until its consumer acknowledges it
(a request once its final chunk is in its output stream, a job once it ended), and an entry whose
consumer stopped answering for ``reclaim_idle_ms`` is taken over (XAUTOCLAIM) by another engine. Each
delivery raises the entry's delivery counter (XPENDING ``times_delivered``; heartbeats do not, and a
hand-back on a clean stop lowers it by one first, so a drained entry is no failed delivery). An
entry claimed with a counter above ``MAX_DELIVERIES`` (a poison message: its engines kept dying while
processing it) is not processed again: it is added to ``dead-letter`` with its error, acknowledged and
deleted, and its client is answered — a request with a final error chunk (``OutputChunk.failure``, 500)
in its output stream, a job with phase ``Failed`` and the error as ``message`` in its progress hash. An
error an engine catches (bad parameters, non-finite logits, a failed adapter load, a broken dataset)
fails only its request or job right away and never counts as a delivery.
- ``api-wake:{process}``  stream (one entry, expires): an API process wakes its own blocking read of
                          the output streams when a new request starts waiting
"""

from __future__ import annotations

PREFIX = "flexllm"
ENGINE_GROUP = "engines"
PROGRESS_FIELDS = (
    "phase",  # Pending | Queued | Running | Succeeded | Failed | Cancelled
    "step",
    "total_steps",
    "loss",
    "tokens_per_second",
    "eta_seconds",
    "message",
    "updated",  # unix seconds
)
TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})
REPLICA_TTL_S = 30
MAX_DELIVERIES = 3  # deliveries of a request or job entry before it is dead-lettered
DEAD_LETTER_MAXLEN = 10_000  # the dead-letter stream keeps about this many newest records


def service_prefix(service: str) -> str:
    return f"{PREFIX}:{service}"


def request_stream(service: str) -> str:
    return f"{service_prefix(service)}:requests"


def output_stream(service: str, request_id: str) -> str:
    return f"{service_prefix(service)}:out:{request_id}"


def job_stream(service: str) -> str:
    return f"{service_prefix(service)}:jobs"


def job_progress(service: str, job: str) -> str:
    return f"{service_prefix(service)}:job:{job}"


def job_cancel_flag(service: str, job: str) -> str:
    return f"{job_progress(service, job)}:cancel"


def job_versions(service: str, job: str) -> str:
    return f"{job_progress(service, job)}:versions"


def dead_letter_stream(service: str) -> str:
    return f"{service_prefix(service)}:dead-letter"


def adapter_channel(service: str) -> str:
    return f"{service_prefix(service)}:adapters"


def replica_state(service: str, replica: str) -> str:
    return f"{service_prefix(service)}:replica:{replica}"


def replica_pattern(service: str) -> str:
    return f"{service_prefix(service)}:replica:*"


CANCEL_FLAG_TTL_S = 24 * 3600  # the operator keeps a deleted job's cancel flag this long
OUTPUT_TTL_S = 600  # an output stream nobody reads any more expires after this long


def api_wake_stream(service: str, process: str) -> str:
    return f"{service_prefix(service)}:api-wake:{process}"


def request_cancel_flag(service: str, request_id: str) -> str:
    """String ``"1"`` once the client went away: the engine aborts the request."""
    return f"{service_prefix(service)}:cancel:{request_id}"


def adapter_versions(service: str) -> str:
    """Hash ``name@vN`` -> JSON ``{"adapter", "version", "uri", "step", "loss", "time"}``: what may be served.

    Announcements on ``adapter_channel`` carry ``"removed": true`` when a version is retired.
    """
    return f"{service_prefix(service)}:adapter-versions"


def job_pattern(service: str) -> str:
    """Matches every job progress hash (and its ``:cancel``/``:versions`` keys) of a service; ``*`` for all."""
    return f"{service_prefix(service)}:job:*"
