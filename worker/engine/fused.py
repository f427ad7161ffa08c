"""Frozen linears shared by several row groups: the fused co-serving forward.

A decoder layer's code for one group of rows (the inference batch, or a fine-tuning work unit's
chunk) is a generator: at each frozen projection it yields ``(module, x)`` and is sent back the
base output ``x @ W^T + b``; it adds its own LoRA deltas and attention. ``run_alone`` drives one
group; ``run_fused`` drives several in lockstep, so every projection is one GEMM over all groups'
rows concatenated (a decode batch's few rows ride along nearly free with fine-tuning's many).
Rows of a group that trains (``requires_grad``) get their input gradient from the shared GEMM's
output through ``LinearInputGrad``, which saves only the frozen weight (the pruned graph).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

# yields (frozen linear, its input [n, in]); is sent its base output [n, out]; returns the layer's result
LayerSteps = Generator[tuple[nn.Linear, torch.Tensor], torch.Tensor, Any]


class Rider(Protocol):
    """Rows that join the inference forward at ``layers`` (a fine-tuning work unit)."""

    layers: range
    requires_grad: bool

    def layer_steps(self, layer: int) -> LayerSteps: ...


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def run_alone(steps: LayerSteps) -> Any:
    """Drive one group's layer: each projection is a plain ``F.linear``."""
    try:
        request = next(steps)
        while True:
            request = steps.send(linear(*request))
    except StopIteration as done:
        return done.value


class LinearInputGrad(torch.autograd.Function):
    """Attach to ``y`` (x's rows of a frozen linear computed in a shared GEMM) the gradient dx = dy W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return dy @ weight, None, None


def _shared_linear(module: nn.Linear, xs: list[torch.Tensor], grads: list[bool]) -> list[torch.Tensor]:
    """One GEMM over the groups' rows -> each group's output (with its input gradient where it trains)."""
    with torch.no_grad():
        y = linear(module, xs[0] if len(xs) == 1 else torch.cat(xs))
        ys = [y] if len(xs) == 1 else list(y.split([x.shape[0] for x in xs]))
    with torch.enable_grad():
        return [LinearInputGrad.apply(x, module.weight, y) if grad and x.requires_grad else y
                for x, y, grad in zip(xs, ys, grads, strict=True)]


def run_fused(groups: list[tuple[LayerSteps, bool]]) -> list[Any]:
    """Drive layer generators ``(steps, requires_grad)`` in lockstep; -> each one's result.

    All run the same layer's code, so they ask for the same projections in the same order; each
    resumes under its own grad mode.
    """
    results: list[Any] = [None] * len(groups)
    sends: list[torch.Tensor | None] = [None] * len(groups)
    while True:
        requests, finished = [], 0
        for i, (steps, grad) in enumerate(groups):
            with torch.set_grad_enabled(grad):
                try:
                    requests.append(steps.send(sends[i]))
                except StopIteration as done:
                    results[i] = done.value
                    finished += 1
        if finished == len(groups):
            return results
        module = requests[0][0] if not finished else None
        if module is None or any(m is not module for m, _ in requests):
            raise RuntimeError("fused layer groups went out of step")
        sends = _shared_linear(module, [x for _, x in requests], [grad for _, grad in groups])


def run_rider(rider: Rider) -> None:
    """A rider's layers with no batch to ride on."""
    for layer in rider.layers:
        run_fused([(rider.layer_steps(layer), rider.requires_grad)])
