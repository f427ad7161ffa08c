"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeds, logprobs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5  # a smaller positive temperature samples greedily (as vLLM): the same distribution
SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch.Generator takes


@dataclass
class SamplingParams:
    """What a request asks of decoding; invalid values raise ``ValueError`` with the field named."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = all tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per output token (0 = only the chosen token's)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be finite and >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),  # NaN fails every comparison
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (disabled) or >= 1"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


class SamplingError(ValueError):
    """One row could not be sampled (e.g. its logits are not finite): its request fails, the batch goes on."""


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[SampledToken | SamplingError]:
    """logits [B, V] fp32 -> one token per row, each row by its own params and generator; a row that
    cannot be sampled gets a ``SamplingError`` in its place."""
    want_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    greedy_ids = logits.argmax(dim=-1).tolist()
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    out: list[SampledToken | SamplingError] = []
    for i, p in enumerate(params):
        if not finite[i]:
            out.append(SamplingError("the model produced non-finite logits (NaN or infinity) for this request"))
            continue
        try:
            token = greedy_ids[i] if p.greedy else _sample_row(logits[i], p, generators[i])
        except RuntimeError as error:
            out.append(SamplingError(f"sampling failed: {error}"))
            continue
        sampled = SampledToken(token)
        if p.logprobs is not None:
            row = logprobs[i]
            sampled.logprob = float(row[token])
            if p.logprobs:
                values, ids = row.topk(p.logprobs)
                sampled.top_logprobs = dict(zip(ids.tolist(), values.tolist(), strict=True))
        out.append(sampled)
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """finite logits [V] -> a token drawn after temperature, top-k and top-p."""
    logits = (logits - logits.max()) / p.temperature  # <= 0 with a 0 at the top: no overflow, never NaN
    if p.top_k > 0:
        kth = logits.topk(min(p.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # the top token stays, also for a top_p that is 0 in float32 (e.g. 5e-324)
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
