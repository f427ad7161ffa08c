"""One micro-batch's token-level forward and split backward, in budget-sized work units.

The micro-batch's sequences are packed back to back into one stream of T tokens (per-sequence
positions, block-diagonal causal attention), so a unit crosses sequence boundaries and fills its
token budget however short the sequences are. The stream is worked through in groups of whole
sequences (up to ``window`` tokens, or one longer sequence); no token attends across a sequence
boundary, so each group's forward and backward are independent of the others'.

Forward: chunks [s, e) of the stream run through the layers without a graph, in layer blocks,
keeping each layer's input (the residual stream, ``checkpoints`` [L, G, H] for the G tokens of the
group) and each layer's K/V ([L, G, H_kv, D], private buffers: training K/V need gradients, live
only until the group's backward ends and never enter the inference block pool).

Backward: reverse token windows [s, e); each window walks the layers top-down in layer blocks.
A unit recomputes its layers for the window from the checkpoint (rematerialization), then
backpropagates the gradient arriving from above plus the dK/dV that later windows' attention
left for this window's K/V; it adds dK/dV of earlier positions into ``dk``/``dv`` (one layer's
slice at a time) and LoRA gradients into ``.grad``. A group's top window may skip its no-grad
forward: a "tail" unit runs it from the embeddings with the graph and backpropagates at once (a
group that fits the budget is a single tail unit: no rematerialization at all). Every term of the
full gradient is produced exactly once, so the result does not depend on how units are cut.

Unit sizes: a unit of w tokens through k of the L layers costs ceil((w k + t h) / L) tokens, where
the loss (LM head forward and backward over the unit's t target tokens, in units at the top only)
counts as h = head_layers layers (its weights over one layer's). A budget b at least the
``window`` runs b tokens through all layers; a smaller one starts a span of min(window, b L)
tokens and runs it through the few layers it pays for (cheaper than all layers of b tokens). A
span in progress that one layer of exceeds a later, smaller budget is split: its first (forward)
or last (backward) tokens that fit go on alone, so no unit costs more than its budget (but for the
least unit, one token through one layer, should its loss alone cost more).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from flexllm.worker.engine.fused import LayerSteps, run_rider
from flexllm.worker.engine.model import CausalLM, ModelArgs
from flexllm.worker.finetune.data import TrainingSequence
from flexllm.worker.finetune.layer import ChunkInput, Dropout, decoder_layer, loss_sum
from flexllm.worker.finetune.lora_params import LoRAWeights

DEFAULT_WINDOW = 256  # most tokens of a group of sequences; span of layer-blocked units for small budgets


@dataclass
class Unit:
    """One planned work unit: its rows' code for each of ``layers`` (an ``engine.fused.Rider``), then
    ``finish`` (the backward pass and bookkeeping) once those layers ran."""

    kind: Literal["forward", "backward"]
    cost: int  # tokens: w tokens through k of the L layers, plus their loss at the top (module docstring)
    layers: range
    requires_grad: bool
    layer_steps: Callable[[int], LayerSteps]
    finish: Callable[[], None] = lambda: None
    # training progress in tokens: a token is trained once it went forward and backward through every
    # layer, so w tokens through k layers one way count w k / 2L (a tail unit, both ways, counts w)
    trained: float = 0.0


def head_cost_in_layers(args: ModelArgs) -> float:
    """The LM head's weights over one decoder layer's: what the loss of one token costs, in layers."""
    layer = sum(i * o for i, o in args.target_features().values())
    return args.vocab_size * args.hidden_size / layer


def whole_budget(args: ModelArgs, tokens: int) -> int:
    """The budget under which ``tokens`` tokens go forward and backward in one unit, every one's
    loss included (fine-tuning alone, where a budget only bounds a unit's size)."""
    return math.ceil(tokens * (args.num_layers + head_cost_in_layers(args)) / args.num_layers)


def _packed(seqs: list[TrainingSequence], keys: list[int]) -> dict[str, list[int]]:
    """Per-token columns of the packed stream (``targets``: the token position t predicts)."""
    cols: dict[str, list[int]] = {k: [] for k in ("ids", "targets", "positions", "keys")}
    for seq, key in zip(seqs, keys, strict=True):
        n = len(seq)
        cols["ids"] += seq.token_ids
        cols["targets"] += [t if m else -100 for t, m in zip(seq.token_ids[1:], seq.is_target[1:], strict=True)]
        cols["targets"].append(-100)
        cols["positions"] += range(n)
        cols["keys"] += [key] * n
    return cols


class BatchWork:
    """``unit(budget)`` until ``finished``; ``next_is_backward`` says which kind comes next.

    The loss is scaled by ``loss_scale`` (1 / loss tokens of the optimizer step) before backward.
    ``dropout_keys`` (one per sequence) seed the LoRA dropout masks when ``dropout`` > 0.
    """

    def __init__(
        self,
        model: CausalLM,
        lora: LoRAWeights,
        seqs: list[TrainingSequence],
        loss_scale: float,
        dropout: float = 0.0,
        dropout_keys: list[int] | None = None,
        window: int | None = None,
        head_layers: float | None = None,
    ):
        self.model, self.lora, self.loss_scale, self.dropout = model, lora, loss_scale, dropout
        self.window = window or DEFAULT_WINDOW
        args, weight = model.args, model.embed_tokens.weight
        device = weight.device
        cols = {k: torch.tensor(v, device=device) for k, v in _packed(seqs, dropout_keys or [0] * len(seqs)).items()}
        self.token_ids, self.targets = cols["ids"], cols["targets"]  # [T]
        self.positions, self.keys = cols["positions"], cols["keys"]
        self.bounds = list(itertools.accumulate((len(s) for s in seqs), initial=0))  # sequence i: [b_i, b_i+1)
        self.num_layers, self.length = args.num_layers, self.token_ids.shape[0]
        self.head_layers = head_cost_in_layers(args) if head_layers is None else head_layers
        # target tokens before stream index i (the loss's rows in a range)
        self._targets_before = list(itertools.accumulate((t != -100 for t in cols["targets"].tolist()), initial=0))
        # the group of whole sequences in progress: forward, then backward, then the next group
        self.group_start = self.group_end = 0
        self.forward_pos = 0  # tokens of the group through every layer (from group_start)
        self.window_end = 0  # backward: tokens of the group below this are in no window yet
        # forward pieces in progress, left to right: (start, end, next layer)
        self._ahead: list[tuple[int, int, int]] = []
        # backward pieces in progress, right to left: (start, end, top layer, gradient at the top [w, H])
        self._behind: list[tuple[int, int, int, torch.Tensor | None]] = []
        self.loss_sum = 0.0  # unscaled summed cross-entropy
        self._next_group()

    @property
    def forward_done(self) -> bool:
        """The current group's forward is done."""
        return self.forward_pos == self.group_end

    @property
    def finished(self) -> bool:
        return self.group_end == self.length and self.window_end == self.group_start and not self._behind

    @property
    def next_is_backward(self) -> bool:
        """Backward work comes next (a budget too small for the tail unit gets a forward unit)."""
        return self.forward_done or (not self._ahead and self.group_end - self.forward_pos <= self.window)

    def unit(self, budget: int) -> tuple[int, Literal["forward", "backward"]]:
        """Run one unit costing at most ``budget`` tokens on its own -> (cost, kind)."""
        unit = self.plan(budget)
        run_rider(unit)
        return self.finish(unit)

    def plan(self, budget: int) -> Unit:
        """The next unit, costing at most ``budget`` tokens: run its layers (alone or riding an inference
        forward), then ``finish`` it before planning the next."""
        if self.forward_done:
            return self._backward_unit(budget)
        if not self._ahead and self._tail_fits(budget):
            return self._tail_unit()
        return self._forward_unit(budget)

    def finish(self, unit: Unit) -> tuple[int, Literal["forward", "backward"]]:
        """Complete a unit whose layers ran -> (cost, kind)."""
        unit.finish()
        if self.window_end == self.group_start and not self._behind and self.group_end < self.length:
            self._next_group()
        return unit.cost, unit.kind

    def _next_group(self) -> None:
        """Start the next run of whole sequences of up to ``window`` tokens (at least one sequence).

        No token attends across a sequence boundary, so groups are independent: a group that fits
        the budget is one tail unit, with no no-grad forward and no rematerialization.
        """
        start = self.group_end
        first = self.bounds.index(start)
        end = self.bounds[first + 1]
        for bound in self.bounds[first + 2 :]:
            if bound - start > self.window:
                break
            end = bound
        self.group_start = self.forward_pos = start
        self.group_end = self.window_end = end
        args, weight = self.model.args, self.model.embed_tokens.weight
        # the group's buffers, replaced by the next group's (rows: the group's tokens, see ``_rows``)
        self.checkpoints = weight.new_empty(self.num_layers, end - start, args.hidden_size)
        kv_shape = (self.num_layers, end - start, args.num_kv_heads, args.head_dim)
        self.k, self.v = weight.new_empty(kv_shape), weight.new_empty(kv_shape)
        self.dk, self.dv = weight.new_zeros(kv_shape), weight.new_zeros(kv_shape)

    def _rows(self, start: int, end: int) -> slice:
        """Stream tokens [start, end) of the current group as rows of its buffers."""
        return slice(start - self.group_start, end - self.group_start)

    # -- sizes -------------------------------------------------------------------------------
    def _span(self, budget: int, available: int) -> int:
        return min(available, max(budget, min(self.window, budget * self.num_layers)))

    def _cost(self, width: int, layers: int, head: float = 0.0) -> int:
        return math.ceil((width * layers + head) / self.num_layers)

    def _head(self, start: int, end: int) -> float:
        """Layer-tokens of the loss over the targets among tokens [start, end)."""
        return (self._targets_before[end] - self._targets_before[start]) * self.head_layers

    def _tail_fits(self, budget: int) -> bool:
        start, end = self.forward_pos, self.group_end
        return end - start <= self.window and self._cost(end - start, self.num_layers, self._head(start, end)) <= budget

    def _chunk(self, start: int, end: int) -> tuple[ChunkInput, int]:
        """The chunk's inputs and ``lo``, the stream index of its first sequence's first token."""
        cos, sin = self.model.rotary.cos_sin(self.positions[start:end], self.model.embed_tokens.weight.dtype)
        dropout = None
        if self.dropout:
            dropout = Dropout(self.dropout, self.keys[start:end], self.positions[start:end])
        first = bisect.bisect_right(self.bounds, start) - 1
        lo, runs = self.bounds[first], []
        for s0, s1 in itertools.pairwise(self.bounds[first:]):
            if s0 >= end:
                break
            runs.append((s0 - lo, max(s0, start) - lo, min(s1, end) - lo))
        return ChunkInput(cos, sin, runs, dropout), lo

    # -- forward ---------------------------------------------------------------------------
    def _forward_unit(self, budget: int) -> Unit:
        if not self._ahead:  # a new chunk; it stops short of a window-sized tail for the tail unit
            start, left = self.forward_pos, self.group_end - self.forward_pos
            width = self._span(budget, left)
            end = start + (min(width, left - self.window) if left > self.window else width)
            with torch.no_grad():
                self.checkpoints[0, self._rows(start, end)] = self.model.embed_tokens(self.token_ids[start:end])
            self._ahead = [(start, end, 0)]
        start, end, first = self._ahead.pop(0)
        layers = budget * self.num_layers // (end - start)
        if layers == 0:  # split: the first b L tokens go one layer on
            self._ahead.insert(0, (start + budget * self.num_layers, end, first))
            end, layers = start + budget * self.num_layers, 1
        layers = min(layers, self.num_layers - first)
        if first + layers < self.num_layers:
            self._ahead.insert(0, (start, end, first + layers))
        else:
            self.forward_pos = end
        chunk, lo = self._chunk(start, end)
        past, rows = self._rows(lo, start), self._rows(start, end)

        def layer_steps(layer: int) -> LayerSteps:
            x = self.checkpoints[layer, rows]  # [n, H]: the embeddings or the layer below's output
            x, k, v = yield from decoder_layer(
                self.model, self.lora, layer, x, chunk, self.k[layer, past], self.v[layer, past]
            )
            self.k[layer, rows], self.v[layer, rows] = k, v
            if layer + 1 < self.num_layers:
                self.checkpoints[layer + 1, rows] = x

        cost = self._cost(end - start, layers)
        trained = (end - start) * layers / (2 * self.num_layers)
        return Unit("forward", cost, range(first, first + layers), False, layer_steps, trained=trained)

    # -- backward ----------------------------------------------------------------------------
    def _tail_unit(self) -> Unit:
        """Forward the rest of the group with the graph, all layers, and backpropagate it."""
        start, end = self.forward_pos, self.group_end
        with torch.no_grad():
            x_in = self.model.embed_tokens(self.token_ids[start:end])
        self.forward_pos, self.window_end = end, start
        unit = self._backward_layers(start, end, 0, self.num_layers, x_in, None)
        unit.trained *= 2  # both ways
        return unit

    def _backward_unit(self, budget: int) -> Unit:
        if not self._behind:  # a new window
            width = self._span(budget, self.window_end - self.group_start)
            self.window_end -= width
            self._behind = [(self.window_end, self.window_end + width, self.num_layers, None)]
        start, end, top, grad = self._behind.pop(0)
        head = self._head if top == self.num_layers else lambda a, b: 0.0
        layers = max(0, int((budget * self.num_layers - head(start, end)) // (end - start)))
        if layers == 0 and end - start > 1:  # split: the last tokens that fit one layer (with their loss) go down
            cut = end - 1
            while cut - 1 > start and (end - cut + 1) + head(cut - 1, end) <= budget * self.num_layers:
                cut -= 1
            left, right = (None, None) if grad is None else (grad[: cut - start], grad[cut - start :])
            self._behind.insert(0, (start, cut, top, left))
            start, grad = cut, right
        layers = max(layers, 1)
        bottom = top - min(layers, top)
        return self._backward_layers(start, end, bottom, top, self.checkpoints[bottom, self._rows(start, end)], grad)

    def _backward_layers(
        self, start: int, end: int, bottom: int, top: int, x_in: torch.Tensor, grad_top: torch.Tensor | None
    ) -> Unit:
        """Recompute layers [bottom, top) of [start, end) from x_in [w, H] with the graph, then
        backpropagate (``finish``).

        ``grad_top`` [w, H]: the gradient of layer ``top``'s input (None at the top: the loss). The
        gradient of x_in (for layers below ``bottom``) goes back on the backward pieces in progress.
        """
        chunk, lo = self._chunk(start, end)
        past_rows, rows = self._rows(lo, start), self._rows(start, end)
        x_in = x_in.detach().requires_grad_(bottom > 0)
        recomputed = {"x": x_in}
        outputs, grads, past = [], [], []

        def layer_steps(layer: int) -> LayerSteps:
            k_past = self.k[layer, past_rows].detach().requires_grad_(start > lo)
            v_past = self.v[layer, past_rows].detach().requires_grad_(start > lo)
            x, k, v = yield from decoder_layer(
                self.model, self.lora, layer, recomputed["x"], chunk, k_past, v_past
            )
            recomputed["x"] = x
            outputs.extend((k, v))
            grads.extend((self.dk[layer, rows], self.dv[layer, rows]))
            past.append((layer, k_past, v_past))

        def finish() -> None:
            with torch.enable_grad():
                if top == self.num_layers:
                    loss = loss_sum(self.model, recomputed["x"], self.targets[start:end])
                    self.loss_sum += loss.item()
                    outputs.append(loss * self.loss_scale)
                    grads.append(torch.ones_like(loss))
                else:
                    outputs.append(recomputed["x"])
                    grads.append(grad_top)
                leaves = [x_in] if bottom > 0 else []
                leaves += [t for _, kp, vp in past for t in (kp, vp) if start > lo]
                leaves += [p for layer in range(bottom, top) for p in self.lora.layer_parameters(layer)]
                live = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
                torch.autograd.backward([o for o, _ in live], [g for _, g in live], inputs=leaves)
            if start > lo:
                for layer, k_past, v_past in past:
                    self.dk[layer, past_rows] += k_past.grad
                    self.dv[layer, past_rows] += v_past.grad
            if bottom > 0:
                self._behind.insert(0, (start, end, bottom, x_in.grad))

        cost = self._cost(end - start, top - bottom, self._head(start, end) if top == self.num_layers else 0)
        trained = (end - start) * (top - bottom) / (2 * self.num_layers)
        return Unit("backward", cost, range(bottom, top), True, layer_steps, finish, trained)
