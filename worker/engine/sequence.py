"""A request's sequence: its tokens, how many are in the KV cache, and its state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from flexllm.worker.engine.detokenizer import IncrementalDetokenizer
from flexllm.worker.engine.sampling import SampledToken, SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Tokens = prompt + outputs; ``num_computed_tokens`` of them already sit in the KV cache."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    lora_name: str | None = None
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    prefix_hashes: list[bytes] = field(default_factory=list)  # see BlockManager._prefix_hashes
    num_cached_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    lora_slot: int = -1
    finish_reason: str | None = None
    detokenizer: IncrementalDetokenizer | None = None  # its output text (set by the engine, which has the tokenizer)
    sent_text_len: int = 0
    sent_token_len: int = 0
    logprobs: list[SampledToken] = field(default_factory=list)
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def output_text(self) -> str:
        return self.detokenizer.text if self.detokenizer else ""

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
