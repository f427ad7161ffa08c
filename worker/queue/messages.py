"""What travels through the request and output streams (JSON in the ``data`` field); no engine types."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class InferenceRequest:
    """A tokenized request: the API tokenizes (and applies the chat template), engines only generate."""

    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields
    lora: str | None = None  # a concrete adapter version name@vN, or None for the base model
    arrival_time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> InferenceRequest:
        return cls(**json.loads(data))


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None
    top: dict[int, float] | None = None


@dataclass
class OutputChunk:
    """New tokens of one request, or its error; ``finished`` marks the last chunk."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative, including this chunk
    error: dict[str, Any] | None = None  # {"status": int, "type": str, "message": str}

    @classmethod
    def failure(cls, status: int, kind: str, message: str) -> OutputChunk:
        return cls(finished=True, finish_reason="error", error={"status": status, "type": kind, "message": message})

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> OutputChunk:
        raw = json.loads(data)
        if raw.get("logprobs") is not None:
            raw["logprobs"] = [TokenLogprob(t["token_id"], t["logprob"],
                                            {int(k): v for k, v in t["top"].items()} if t["top"] else None)
                               for t in raw["logprobs"]]
        return cls(**raw)
