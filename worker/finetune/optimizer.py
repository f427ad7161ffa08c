"""AdamW (default) or SGD with linear warmup then cosine decay to zero, and gradient clipping."""

from __future__ import annotations

import math

import torch

from flexllm.worker.finetune.spec import TrainingSpec


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier per step: linear warmup from 0, then cosine decay to 0 (as HF's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def build_optimizer(params: list[torch.nn.Parameter], training: TrainingSpec, total_steps: int):
    """-> (optimizer, LR scheduler) for the LoRA parameters."""
    if training.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(training.warmup_steps, total_steps))
    return optimizer, schedule


def optimizer_step(
    optimizer, schedule, params: list[torch.nn.Parameter], max_grad_norm: float | None
) -> float:
    """Clip (if asked), step, advance the schedule, zero the gradients; returns the pre-clip grad norm."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = (
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None
    )
    if max_grad_norm is not None and grads:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm) if norm is not None else 0.0
