"""One training sequence's token-level forward and split backward, in budget-sized work units.

Forward: chunks of any size run all layers without a graph, keeping each layer's input (the
residual stream, ``checkpoints`` [L+1, T, H]) and each layer's K/V ([L, T, H_kv, D], a private
per-sequence buffer: training K/V need gradients, live only until the sequence's backward ends
and never enter the inference block pool).

Backward: reverse token windows [s, e); each window walks the layers top-down in layer blocks.
A unit recomputes its layers for the window from the checkpoint (rematerialization), then
backpropagates the gradient arriving from above plus the dK/dV that later windows' attention
left for this window's K/V; it adds dK/dV of positions < s into ``dk``/``dv`` and LoRA gradients
into ``.grad``. Every term of the full-sequence gradient is produced exactly once, so the result
does not depend on chunk, window or block sizes.
"""

from __future__ import annotations

import math

import torch

from flexllm.worker.engine.model import CausalLM
from flexllm.worker.finetune.data import TrainingSequence
from flexllm.worker.finetune.layer import ChunkInput, Dropout, decoder_layer, loss_sum
from flexllm.worker.finetune.lora_params import LoRAWeights


class SequenceWork:
    """``forward_chunk(n)`` until ``forward_done``, then ``backward_unit(budget)`` until ``finished``.

    The loss is scaled by ``loss_scale`` (1 / loss tokens of the optimizer step) before backward.
    """

    def __init__(
        self,
        model: CausalLM,
        lora: LoRAWeights,
        seq: TrainingSequence,
        loss_scale: float,
        dropout: Dropout | None = None,
        backward_window: int | None = None,
    ):
        self.model, self.lora, self.loss_scale, self.dropout = model, lora, loss_scale, dropout
        self.backward_window = backward_window
        args, weight = model.args, model.embed_tokens.weight
        self.num_layers, self.length = args.num_layers, len(seq)
        device = weight.device
        self.token_ids = torch.tensor(seq.token_ids, device=device)  # [T]
        targets = torch.tensor(seq.token_ids[1:] + (0,), device=device)
        is_target = torch.tensor(seq.is_target[1:] + (False,), device=device)
        self.targets = torch.where(is_target, targets, -100)  # [T]: the token position t predicts
        self.checkpoints = weight.new_empty(self.num_layers + 1, self.length, args.hidden_size)
        kv_shape = (self.num_layers, self.length, args.num_kv_heads, args.head_dim)
        self.k, self.v = weight.new_empty(kv_shape), weight.new_empty(kv_shape)
        self.dk, self.dv = weight.new_zeros(kv_shape), weight.new_zeros(kv_shape)
        self.forward_pos = 0
        self.window_end = self.length  # backward: windows below this are still to do
        self.window: tuple[int, int] | None = None  # the window in progress
        self.layer_top = self.num_layers  # layers of the current window below this are still to do
        self.grad_out: torch.Tensor | None = None  # [w, H] gradient of checkpoint ``layer_top``
        self.loss_sum = 0.0  # unscaled summed cross-entropy

    @property
    def forward_done(self) -> bool:
        return self.forward_pos == self.length

    @property
    def finished(self) -> bool:
        return self.window_end == 0

    def _chunk(self, start: int, end: int) -> ChunkInput:
        positions = torch.arange(start, end, device=self.token_ids.device)
        cos, sin = self.model.rotary.cos_sin(positions, self.checkpoints.dtype)
        return ChunkInput(start, cos, sin, self.dropout)

    @torch.no_grad()
    def forward_chunk(self, max_tokens: int) -> int:
        """Run the next ``max_tokens`` (or fewer) tokens through every layer; returns the tokens done."""
        start = self.forward_pos
        end = min(self.length, start + max_tokens)
        chunk = self._chunk(start, end)
        x = self.model.embed_tokens(self.token_ids[start:end])  # [n, H]
        for layer in range(self.num_layers):
            self.checkpoints[layer, start:end] = x
            x, k, v = decoder_layer(
                self.model, self.lora, layer, x, chunk, self.k[layer, :start], self.v[layer, :start]
            )
            self.k[layer, start:end], self.v[layer, start:end] = k, v
        self.checkpoints[self.num_layers, start:end] = x
        self.forward_pos = end
        return end - start

    def backward_unit(self, budget: int) -> int:
        """One unit costing at most ``budget`` tokens (w tokens x k of L layers costs ceil(w k / L))."""
        L = self.num_layers
        if self.window is None:
            width = budget if self.backward_window is None else min(self.backward_window, budget * L)
            self.window = (max(0, self.window_end - width), self.window_end)
        start, end = self.window
        width = end - start
        num_layers = max(1, min(self.layer_top, budget * L // width))
        bottom = self.layer_top - num_layers
        self._backward_layers(start, end, bottom, self.layer_top)
        self.layer_top = bottom
        if bottom == 0:
            self.window_end, self.window, self.layer_top, self.grad_out = start, None, L, None
        return math.ceil(width * num_layers / L)

    def _backward_layers(self, start: int, end: int, bottom: int, top: int) -> None:
        chunk = self._chunk(start, end)
        x_in = self.checkpoints[bottom, start:end].clone().requires_grad_()
        x, outputs, grads, past_leaves = x_in, [], [], []
        with torch.enable_grad():
            for layer in range(bottom, top):
                k_past = self.k[layer, :start].detach().requires_grad_()
                v_past = self.v[layer, :start].detach().requires_grad_()
                x, k, v = decoder_layer(self.model, self.lora, layer, x, chunk, k_past, v_past)
                outputs += [k, v]
                grads += [self.dk[layer, start:end], self.dv[layer, start:end]]
                past_leaves.append((layer, k_past, v_past))
            if top == self.num_layers:
                loss = loss_sum(self.model, x, self.targets[start:end])
                self.loss_sum += loss.item()
                outputs.append(loss * self.loss_scale)
                grads.append(torch.ones_like(loss))
            else:
                outputs.append(x)
                grads.append(self.grad_out)
            leaves = [x_in] + [t for _, kp, vp in past_leaves for t in (kp, vp) if start > 0]
            leaves += [p for layer in range(bottom, top) for p in self.lora.layer_parameters(layer)]
            torch.autograd.backward(outputs, grads, inputs=leaves)
        self.grad_out = x_in.grad
        if start > 0:
            for layer, k_past, v_past in past_leaves:
                self.dk[layer, :start] += k_past.grad
                self.dv[layer, :start] += v_past.grad
