"""Redis key layout and message fields shared by the worker and the operator.

Every key of one InferenceService lives under ``flexllm:{service}:``; a FinetuneJob's
keys under ``flexllm:{service}:job:{job}``. Both sides import these helpers, so the
layout is written down exactly once.

- ``requests``            stream, consumer group ``engines``: inference requests (field ``data``, JSON)
- ``out:{request_id}``    stream: one entry per output chunk (field ``data``, JSON); expires after use
- ``jobs``                stream, consumer group ``engines``: FinetuneJob submissions (``data``: a
                          ``JobSubmission``, JSON ``{"name", "namespace", "spec"}``; ``spec`` is the CR's spec)
- ``job:{job}``           hash: a ``JobProgress`` (its fields, snake_case, numbers as strings)
- ``job:{job}:cancel``    a ``JobCancel`` (JSON ``{"reason"}``) once the job is cancelled
- ``job:{job}:versions``  list of ``AdapterVersion`` JSON ``{"adapter", "version", "uri", "step", "loss", "time"}``
- ``adapters``            pub/sub channel: an ``AdapterAnnouncement`` for every new or retired version
- ``replica:{replica}``   hash with a TTL: a ``ReplicaState``, what one replica really serves (``adapters``:
                          JSON list of ``name@vN``; ``ready``; ``updated``; ``failed``: JSON
                          ``{"name@vN": error}`` of hot-loads that failed, cleared on success) — the source
                          of ``status.loadedAdapters`` and the ``AdaptersLoaded`` condition
- ``cancel:{request_id}`` string ``"1"`` once a client went away: the engine aborts the request
- ``adapter-versions``    hash ``name@vN`` -> ``AdapterVersion`` JSON: what may be served
- ``dead-letter``         stream: poison entries taken out of ``requests`` or ``jobs`` (fields ``stream``,
                          ``entry``, ``data`` — the original entry's —, ``error``, ``deliveries``, ``time``)

Messages. Each job, adapter and replica value above is one torch-free class below (``JobSubmission``,
``JobProgress``, ``JobCancel``, ``AdapterVersion``, ``AdapterAnnouncement``, ``ReplicaState``) with the one
way it is written and read; the worker, ``flexllm submit``/``jobs`` and the operator all use them (through
``flexllm.worker.queue.jobs.JobQueue`` for a service's jobs). Requests and output chunks, which only
workers and API processes exchange, are ``flexllm.worker.queue.messages``.

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

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flexllm.worker.names import validate_name

PREFIX = "flexllm"
ENGINE_GROUP = "engines"
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
    """Hash ``name@vN`` -> ``AdapterVersion`` JSON: what may be served (changes announced on ``adapter_channel``)."""
    return f"{service_prefix(service)}:adapter-versions"


def job_pattern(service: str) -> str:
    """Matches every job progress hash (and its ``:cancel``/``:versions`` keys) of a service; ``*`` for all."""
    return f"{service_prefix(service)}:job:*"


# -- messages -----------------------------------------------------------------------------------------
@dataclass
class JobSubmission:
    """A ``jobs`` entry: the FinetuneJob's name, namespace and CR spec (camelCase, as in the YAML)."""

    name: str
    namespace: str
    spec: dict[str, Any]
    reclaimed: bool = False  # not sent: taken over from a dead replica, so it resumes from its last version

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "namespace": self.namespace, "spec": self.spec})

    @classmethod
    def from_json(cls, data: str) -> JobSubmission:
        """Raises ``ValueError`` (``InvalidNameError`` for a name that breaks the rule), ``KeyError``, ``TypeError``."""
        raw = json.loads(data)
        return cls(validate_name(raw["name"], "job"), str(raw.get("namespace", "default")), dict(raw["spec"]))


def _number(raw: Mapping[str, str], key: str, kind: type) -> Any:
    """A hash field as ``kind``; None when absent, unparsable or not finite (JSON has no NaN: the API
    server would refuse a status patch holding one)."""
    try:
        value = float(raw.get(key) or "")
    except ValueError:
        return None
    return kind(value) if math.isfinite(value) else None


def format_duration(seconds: float) -> str:
    """90 -> '1m30s', 3725 -> '1h2m'; kubectl-style."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class JobProgress:
    """A job's progress hash ``job:{job}``. ``None`` is a field not set: a write leaves it as it is."""

    phase: str | None = None  # Pending | Queued | Running | Succeeded | Failed | Cancelled
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = None
    message: str | None = None
    updated: int | None = None  # unix seconds of the last write

    @property
    def percent(self) -> int | None:
        """Steps done out of ``total_steps``, 0-100; None before the total is known."""
        return min(100, (self.step or 0) * 100 // self.total_steps) if self.total_steps else None

    @property
    def display(self) -> str:
        """'30/200 (15%)', or the step alone before the total is known."""
        step = self.step or 0
        return f"{step}/{self.total_steps} ({self.percent}%)" if self.total_steps else str(step)

    @property
    def eta(self) -> str:
        """The estimated time left as '1h2m', '' when unknown."""
        return "" if self.eta_seconds is None else format_duration(self.eta_seconds)

    def to_redis(self) -> dict[str, str | int | float]:
        """The fields that are set, for HSET."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_redis(cls, raw: Mapping[str, str]) -> JobProgress:
        """An HGETALL reply (strings); a missing, unparsable or non-finite number reads as not set."""
        kinds = {"step": int, "total_steps": int, "loss": float, "tokens_per_second": float, "eta_seconds": int,
                 "updated": int}
        return cls(phase=raw.get("phase"), message=raw.get("message"),
                   **{key: _number(raw, key, kind) for key, kind in kinds.items()})


PROGRESS_FIELDS = tuple(f.name for f in fields(JobProgress))


@dataclass(frozen=True)
class JobCancel:
    """The value of ``job:{job}:cancel``: the job stops at its engine's next check, with ``reason`` as its
    message."""

    reason: str = "cancelled"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> JobCancel:
        """Any other value of the flag (an older writer's ``"1"``) is a cancel without a reason."""
        try:
            raw = json.loads(data)
        except ValueError:
            return cls()
        return cls(str(raw.get("reason") or cls.reason)) if isinstance(raw, dict) else cls()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class AdapterVersion:
    """One published adapter version: a value of ``adapter-versions`` and an item of ``job:{job}:versions``."""

    adapter: str
    version: int
    uri: str  # file:// URI of the PEFT folder on the shared volume
    step: int = 0
    loss: float = 0.0
    time: str = field(default_factory=_now)

    @property
    def name(self) -> str:
        """What it is served as: ``<adapter>@v<N>``."""
        return f"{self.adapter}@v{self.version}"

    @property
    def path(self) -> Path:
        return Path(self.uri.removeprefix("file://"))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> AdapterVersion:
        return cls(**json.loads(data))


@dataclass(frozen=True)
class AdapterAnnouncement:
    """A message on ``adapters``: a version became servable, or was retired (``removed``); without a
    version, the registry was filled from the adapter store: every replica re-reads it."""

    version: AdapterVersion | None = None
    removed: bool = False

    def to_json(self) -> str:
        if self.version is None:
            return json.dumps({"resync": True})
        v = self.version
        return json.dumps({"adapter": v.adapter, "version": v.version, "uri": v.uri}
                          | ({"removed": True} if self.removed else {}))

    @classmethod
    def from_json(cls, data: str) -> AdapterAnnouncement:
        raw = json.loads(data)
        if raw.get("resync"):
            return cls()
        return cls(AdapterVersion(raw["adapter"], int(raw["version"]), raw["uri"]), bool(raw.get("removed")))


@dataclass(frozen=True)
class ReplicaState:
    """A replica hash ``replica:{replica}``: the adapter versions one replica has loaded, whether it takes
    requests, and the hot-loads that failed (``name@vN`` -> error)."""

    adapters: tuple[str, ...] = ()
    ready: bool = False
    updated: int | None = None  # unix seconds of the last report
    failed: dict[str, str] = field(default_factory=dict)

    def to_redis(self) -> dict[str, str | int]:
        mapping: dict[str, str | int] = {"adapters": json.dumps(sorted(self.adapters)),
                                         "ready": "1" if self.ready else "0", "failed": json.dumps(self.failed)}
        return mapping | ({} if self.updated is None else {"updated": self.updated})

    @classmethod
    def from_redis(cls, raw: Mapping[str, str]) -> ReplicaState:
        return cls(tuple(sorted(json.loads(raw.get("adapters") or "[]"))),
                   raw.get("ready", "").lower() in ("1", "true", "yes"), _number(raw, "updated", int),
                   dict(json.loads(raw.get("failed") or "{}")))
