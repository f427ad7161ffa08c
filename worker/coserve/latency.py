"""A linear model of iteration time, profiled at start-up and refitted online.

    t = c0 + c_infer * inference_tokens + c_ctx * decode_context_tokens
           + c_fwd * finetune_forward_tokens + c_bwd * finetune_backward_tokens + c_unit * finetune_units
           + c_rider * finetune_riders

(a fine-tuning work unit of its own pass over the layers carries a fixed cost; so does a forward
chunk riding the inference forward: its own attention, LoRA and bookkeeping per layer, measured on
a busy 2-core machine at about one decode step's worth)

Least squares over a sliding window of measured iterations; coefficients are kept >= 0 so the
model stays monotone and can be inverted into a token budget. Budgets also leave room for the
model's recent error (the 90th percentile of its under-predictions, kept apart for iterations with
fine-tuning forward or backward work, whose units a linear model prices less well than inference),
so a biased fit does not turn into missed SLOs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

FEATURES = ("inference_tokens", "decode_context_tokens", "finetune_forward_tokens", "finetune_backward_tokens",
            "finetune_units", "finetune_riders")


@dataclass(frozen=True)
class IterationShape:
    """The work of one iteration, in tokens of each kind."""

    inference_tokens: int = 0
    decode_context_tokens: int = 0
    finetune_forward_tokens: int = 0
    finetune_backward_tokens: int = 0
    finetune_units: int = 0

    @property
    def finetune_riders(self) -> int:
        """Forward chunks that rode the inference forward: one when fine-tuning forward tokens went along
        with inference and no unit needed a pass of its own (one job's unit per iteration)."""
        return int(self.inference_tokens > 0 and self.finetune_forward_tokens > 0 and self.finetune_units == 0)

    def vector(self) -> list[float]:
        return [1.0, *(float(getattr(self, f)) for f in FEATURES)]


class LatencyModel:
    def __init__(self, window: int = 256, refit_every: int = 16, error_window: int = 64):
        self.samples: deque[tuple[list[float], float]] = deque(maxlen=window)
        # measured - predicted seconds, by the iteration's heaviest kind of work (see ``_error_kind``)
        self.errors = {kind: deque(maxlen=error_window)
                       for kind in ("inference_tokens", "finetune_forward_tokens", "finetune_backward_tokens")}
        self.refit_every = refit_every
        self.coef = [0.0, 1e-3, 0.0, 1e-3, 2e-3, 0.0, 0.0]  # seconds; replaced by the first fit
        self._since_fit = 0

    def seconds_per(self, feature: str) -> float:
        """The fitted seconds per unit of ``feature`` (a FEATURES name; "intercept" for the fixed part)."""
        return self.coef[0 if feature == "intercept" else 1 + FEATURES.index(feature)]

    def predict(self, shape: IterationShape) -> float:
        return sum(c * x for c, x in zip(self.coef, shape.vector()))

    def observe(self, shape: IterationShape, seconds: float) -> None:
        self.errors[_error_kind(shape)].append(seconds - self.predict(shape))
        self.samples.append((shape.vector(), seconds))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.fit()

    def fit(self) -> None:
        """Non-negative least squares over the window; features never seen keep their estimate."""
        self._since_fit = 0
        if len(self.samples) < 4:
            return
        coef = nonnegative_lstsq([s[0] for s in self.samples], [s[1] for s in self.samples])
        self.coef = [self.coef[i] if c is None else c for i, c in enumerate(coef)]

    def error_margin(self, kind: str = "inference_tokens") -> float:
        """How much the model recently under-predicted iterations that add tokens of ``kind`` (90th
        percentile, >= 0)."""
        errors = self.errors[kind if kind.startswith("finetune") else "inference_tokens"]
        if len(errors) < 8:
            return 0.0
        ordered = sorted(errors)
        return max(0.0, ordered[int(0.9 * (len(ordered) - 1))])

    def max_extra_tokens(self, base: IterationShape, within_s: float, kind: str, cap: int,
                         fixed_s: float = 0.0) -> int:
        """Most tokens of ``kind`` (a FEATURES name) that fit on top of ``base`` (plus ``fixed_s``)
        within ``within_s``."""
        per_token = self.seconds_per(kind)
        margin = self.error_margin(kind)
        room = within_s - self.predict(base) - fixed_s - margin
        if room <= 0:
            return 0
        if per_token <= 0:
            return cap
        return max(0, min(cap, int(room / per_token)))


def nonnegative_lstsq(rows: list[list[float]], seconds: list[float]) -> list[float | None]:
    """Least squares with coefficients >= 0 (clamping the negative ones to 0 and refitting the rest);
    None for a column that is all zeros (nothing to learn it from), or for all when every one clamps."""
    x = torch.tensor(rows, dtype=torch.float64)  # [N, F]
    y = torch.tensor(seconds, dtype=torch.float64)  # [N]
    seen = [i for i in range(x.shape[1]) if x[:, i].abs().sum() > 0]
    active = list(seen)
    while active:
        sol = torch.linalg.lstsq(x[:, active], y[:, None]).solution[:, 0].tolist()
        negative = [a for a, c in zip(active, sol) if c < 0]
        if not negative:
            fitted = dict(zip(active, sol))
            return [fitted.get(i, 0.0) if i in seen else None for i in range(x.shape[1])]
        active = [a for a in active if a not in negative]
    return [None] * x.shape[1]


def _error_kind(shape: IterationShape) -> str:
    if shape.finetune_backward_tokens:
        return "finetune_backward_tokens"
    return "finetune_forward_tokens" if shape.finetune_forward_tokens else "inference_tokens"
