"""What the engine returns for a request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexllm.worker.engine.sampling import SampledToken


@dataclass
class RequestOutput:
    """A request's state: cumulative ``text``/``token_ids`` plus what is new since the last output."""

    request_id: str
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    logprobs: list[SampledToken] = field(default_factory=list)
    arrival_time: float = 0.0
    first_token_time: float | None = None
    error: str | None = None  # why the request failed (finish_reason "error")
