"""Sampling parameters and the batched sampler: penalties, greedy, temperature, top-k, min-p, top-p,
seeds and logprobs for every row of a batch in a few tensor operations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

MAX_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5  # a smaller positive temperature samples greedily (as vLLM): the same distribution
SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch.Generator takes
MAX_PENALTY = 2.0  # presence/frequency penalties lie in [-2, 2] (OpenAI)
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # logits scaled by these stay finite
NUCLEUS_CANDIDATES = 1024  # top-p sorts this many tokens first (the whole vocabulary if they are not enough)


@dataclass
class SamplingParams:
    """What a request asks of decoding; invalid values raise ``ValueError`` with the field named."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = all tokens
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    presence_penalty: float = 0.0  # subtracted from the logit of every token already in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and output tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per output token (0 = only the chosen token's)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        finite = all(isinstance(v, int | float) and math.isfinite(v) for v in
                     (self.presence_penalty, self.frequency_penalty, self.repetition_penalty, self.min_p))
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be finite and >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),  # NaN fails every comparison
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (disabled) or >= 1"),
            (finite and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (finite and abs(self.presence_penalty) <= MAX_PENALTY,
             f"presence_penalty must be in [-{MAX_PENALTY}, {MAX_PENALTY}]"),
            (finite and abs(self.frequency_penalty) <= MAX_PENALTY,
             f"frequency_penalty must be in [-{MAX_PENALTY}, {MAX_PENALTY}]"),
            (finite and REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1],
             f"repetition_penalty must be in [{REPETITION_PENALTY_RANGE[0]}, {REPETITION_PENALTY_RANGE[1]}]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


class SamplingError(ValueError):
    """One row could not be sampled (e.g. its logits are not finite): its request fails, the batch goes on."""


class SamplingRequest(Protocol):
    """What the sampler reads of a request (``Sequence`` is one)."""

    params: SamplingParams
    generator: torch.Generator | None  # its own, for a seeded request
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int


def sample(logits: torch.Tensor, requests: Sequence[SamplingRequest],
           generator: torch.Generator) -> list[SampledToken | SamplingError]:
    """logits [B, V] fp32 -> one token per row, each row by its request's params; a seeded request draws
    from its own generator (so its tokens do not depend on the rest of the batch), the others from
    ``generator`` (on the logits' device). A row that cannot be sampled gets a ``SamplingError``."""
    params = [r.params for r in requests]
    processed = _apply_penalties(logits, requests)
    lowest, highest = torch.aminmax(processed, dim=-1)  # [B] each; NaN if the row holds one
    finite = lowest.isfinite() & highest.isfinite()  # [B]
    finite_list = finite.tolist()
    if not all(finite_list):
        processed = processed.where(finite[:, None], 0.0)  # a broken row must not break the others
    tokens = processed.argmax(dim=-1)  # [B]; greedy rows keep these
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        rows = torch.tensor(drawn, device=logits.device)
        probs = _probabilities(_rows(processed, drawn, rows), [params[i] for i in drawn])  # [S, V]
        tokens[rows] = _draw(probs, [requests[i].generator for i in drawn], generator)
    out: list[SampledToken | SamplingError] = [
        SampledToken(t) if ok else SamplingError("the model produced non-finite logits (NaN or infinity) "
                                                 "for this request")
        for t, ok in zip(tokens.tolist(), finite_list, strict=True)]
    _add_logprobs(logits, tokens, params, out)
    return out


def _rows(x: torch.Tensor, indices: list[int], index: torch.Tensor) -> torch.Tensor:
    """x [B, ...] -> x[index] ([len(indices), ...]), without a copy when that is every row."""
    return x if indices == list(range(x.shape[0])) else x[index]


def _apply_penalties(logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> torch.Tensor:
    """logits [B, V] -> a copy with repetition (prompt and output tokens), frequency and presence
    (output tokens) penalties applied to the rows that ask for them; ``logits`` itself if none do."""
    penalized = [i for i, r in enumerate(requests) if r.params.penalized]
    if not penalized:
        return logits
    batch, vocab = len(penalized), logits.shape[-1]
    device = logits.device
    prompt_ids, output_ids, prompt_rows, output_rows = [], [], [], []
    for row, i in enumerate(penalized):
        r = requests[i]
        prompt_ids += r.token_ids[:r.num_prompt_tokens]
        output_ids += r.token_ids[r.num_prompt_tokens:]
        prompt_rows += [row] * r.num_prompt_tokens
        output_rows += [row] * (len(r.token_ids) - r.num_prompt_tokens)
    counts = torch.zeros(batch, vocab, device=device)  # [P, V] occurrences in the output
    counts.index_put_((torch.tensor(output_rows, device=device, dtype=torch.long),
                       torch.tensor(output_ids, device=device, dtype=torch.long)),
                      torch.ones(len(output_ids), device=device), accumulate=True)
    seen = counts > 0  # [P, V]
    seen_anywhere = seen.clone()
    seen_anywhere[torch.tensor(prompt_rows, device=device, dtype=torch.long),
                  torch.tensor(prompt_ids, device=device, dtype=torch.long)] = True
    column = [[requests[i].params.repetition_penalty, requests[i].params.frequency_penalty,
               requests[i].params.presence_penalty] for i in penalized]
    repetition, frequency, presence = torch.tensor(column, device=device).T[:, :, None]  # each [P, 1]
    rows = torch.tensor(penalized, device=device)
    sub = logits[rows]  # [P, V]
    sub = torch.where(seen_anywhere, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
    sub = sub - frequency * counts - presence * seen
    out = logits.clone()
    out[rows] = sub
    return out


def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """finite logits [S, V] -> probabilities [S, V] after temperature, then top-k, min-p and top-p."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]  # [S, 1]
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # <= 0 with a 0 on top: no overflow
    cut = torch.full((len(params), 1), float("-inf"), device=device)  # [S, 1]: logits below it are dropped
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    min_p = [p.min_p for p in params]
    if any(top_k):
        kth = logits.topk(max(min(k, logits.shape[-1]) for k in top_k), dim=-1).values  # [S, K] descending
        index = torch.tensor([min(k, kth.shape[-1]) - 1 if k else -1 for k in top_k], device=device)[:, None]
        enabled = torch.tensor(top_k, device=device)[:, None] > 0
        cut = torch.where(enabled, kth.gather(-1, index.clamp_min(0)), cut)
    if any(min_p):  # p >= min_p * p_max <=> logit - max_logit >= log(min_p), and the max is 0
        cut = cut.maximum(torch.tensor([[math.log(m) if m > 0 else -math.inf] for m in min_p], device=device))
    if any(top_k) or any(min_p):
        logits = logits.masked_fill(logits < cut, float("-inf"))
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        rows = torch.tensor(nucleus, device=device)
        top_p = torch.tensor([params[i].top_p for i in nucleus], device=device)[:, None]  # [N, 1]
        logits[rows] = logits[rows].masked_fill(_outside_nucleus(logits[rows], top_p), float("-inf"))
    return logits.softmax(dim=-1)


def _outside_nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [N, V], top_p [N, 1] -> [N, V] True for the tokens outside each row's smallest set of
    most likely tokens whose probability reaches top_p. Sorting whole rows is slow (on a CPU, most of
    a step), so the top NUCLEUS_CANDIDATES are sorted first; only if one row's nucleus reaches past
    them are whole rows sorted."""
    vocab = logits.shape[-1]
    log_total = logits.logsumexp(dim=-1, keepdim=True)  # [N, 1]
    for k in dict.fromkeys((min(NUCLEUS_CANDIDATES, vocab), vocab)):
        sorted_logits, order = logits.topk(k, dim=-1)  # [N, k] descending
        sorted_probs = (sorted_logits - log_total).exp()
        cumulative = sorted_probs.cumsum(dim=-1)
        if k == vocab or bool((cumulative[:, -1:] >= top_p).all()):
            break
    drop = cumulative - sorted_probs >= top_p  # keep the smallest prefix reaching top_p
    drop[:, 0] = False  # the top token stays, also for a top_p that is 0 in float32 (e.g. 5e-324)
    return torch.ones_like(logits, dtype=torch.bool).scatter(-1, order, drop)  # beyond the k: dropped


def _draw(probs: torch.Tensor, seeded: list[torch.Generator | None], generator: torch.Generator) -> torch.Tensor:
    """probs [S, V] -> one token per row [S]. A row with its own generator draws as ``torch.multinomial``
    does (argmax of probs / Exp(1) noise, the noise drawn on the CPU), so a seed gives the same tokens
    on any device and in any batch; the others share one uniform draw each by inverse CDF."""
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    own = [i for i, g in enumerate(seeded) if g is not None]
    if own:
        noise = torch.empty(len(own), probs.shape[-1])  # [O, V] on the CPU, where the generators are
        for row, i in enumerate(own):
            noise[row].exponential_(generator=seeded[i])
        rows = torch.tensor(own, device=probs.device)
        tokens[rows] = (_rows(probs, own, rows) / noise.to(probs.device)).argmax(dim=-1)
    shared = [i for i, g in enumerate(seeded) if g is None]
    if shared:
        rows = torch.tensor(shared, device=probs.device)
        cumulative = _rows(probs, shared, rows).cumsum(dim=-1)  # [U, V]
        total = cumulative[:, -1:]  # [U, 1]
        u = torch.rand(len(shared), 1, device=probs.device, generator=generator) * total
        u = u.minimum(total.nextafter(torch.zeros_like(total)))  # < total, also when u * total rounds up
        # the first token whose cumulative probability exceeds u: its own probability is > 0
        tokens[rows] = torch.searchsorted(cumulative, u, right=True).squeeze(-1)
    return tokens


def _add_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams],
                  out: list[SampledToken | SamplingError]) -> None:
    """Fill in the chosen token's logprob and the top-n of the rows that ask (from the raw logits [B, V])."""
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None and isinstance(out[i], SampledToken)]
    if not wanted:
        return
    rows = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits[rows], dim=-1)  # [W, V]
    chosen = logprobs.gather(-1, tokens[rows][:, None]).squeeze(-1).tolist()
    n = max(params[i].logprobs for i in wanted)
    top_values, top_ids = logprobs.topk(n, dim=-1) if n else (logprobs[:, :0], logprobs[:, :0].long())
    for i, logprob, values, ids in zip(wanted, chosen, top_values.tolist(), top_ids.tolist(), strict=True):
        token = out[i]
        token.logprob = logprob
        k = params[i].logprobs
        if k:
            token.top_logprobs = dict(zip(ids[:k], values[:k], strict=True))
