"""Request bodies of the OpenAI API (unknown fields are ignored, as by OpenAI and vLLM).

The bounds here are the ones the server enforces, so the OpenAPI schema (``/openapi.json``) says
what is accepted; what depends on the model (context length, vocabulary) is checked per request.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flexllm.worker.engine.sampling import MAX_LOGPROBS, MAX_PENALTY, REPETITION_PENALTY_RANGE

INT32_MAX = 2**31 - 1
MAX_STOP_SEQUENCES = 16
MAX_STOP_TOKEN_IDS = 256

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # also below the model's vocabulary size (checked per request)
TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions (plus vLLM's ``top_k``, ``ignore_eos``...)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: TokenCount | None = None
    temperature: float | None = Field(None, allow_inf_nan=False, ge=0.0, le=2.0)
    top_p: float | None = Field(None, allow_inf_nan=False, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # -1 or 0: all tokens
    n: int = Field(1, ge=1, le=1, description="only 1 is served")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    ignore_eos: bool = False
    presence_penalty: float | None = Field(None, allow_inf_nan=False, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(None, allow_inf_nan=False, ge=REPETITION_PENALTY_RANGE[0],
                                             le=REPETITION_PENALTY_RANGE[1])
    min_p: float | None = Field(None, allow_inf_nan=False, ge=0.0, le=1.0)
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        """Text must be valid Unicode: a lone surrogate (JSON ``"\\ud800"``) cannot be tokenized."""
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError as error:
            raise ValueError(f"the request holds text that is not valid Unicode ({error.reason})") from None
        except (TypeError, ValueError):
            pass  # not JSON data: the field validators say what is wrong
        return data

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: Logprobs | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; content parts other than text are rejected."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
