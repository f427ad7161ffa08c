"""The one table of LoRA targets: the projections an adapter may target, where each lives in a decoder
layer, PEFT's key names for them and PEFT's scaling rule (torch-free: the operator validates specs with it).
"""

from __future__ import annotations

import math
import re

# a decoder layer's blocks (Hugging Face's names) -> the engine's merged projections -> the targets
# each holds, its output slices in this order
LAYOUT = {
    "self_attn": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",)},
    "mlp": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
}
MERGED = {merged: targets for projections in LAYOUT.values() for merged, targets in projections.items()}
# target -> (its block, its merged projection)
TARGETS = {t: (block, merged) for block, merges in LAYOUT.items() for merged, ts in merges.items() for t in ts}
LORA_TARGETS = tuple(TARGETS)

_PEFT_KEY = re.compile(r"layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight$")  # layer, block, target, A/B


def canonical_targets(targets: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``targets`` in table order without duplicates; ``ValueError`` naming any unsupported one."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unsupported target modules {unknown}; supported: {list(LORA_TARGETS)}")
    return tuple(t for t in LORA_TARGETS if t in targets)


def peft_key(layer: int, target: str, which: str) -> str:
    """PEFT's state-dict key, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.model.layers.{layer}.{TARGETS[target][0]}.{target}.lora_{which}.weight"


def parse_peft_key(key: str) -> tuple[int, str, str] | None:
    """``peft_key``'s inverse -> (layer, target, "A" or "B"); None for any other key."""
    match = _PEFT_KEY.search(key)
    if match is None or TARGETS.get(match[3], (None,))[0] != match[2]:
        return None
    return int(match[1]), match[3], match[4]


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha / r, or rank-stabilized (rsLoRA) alpha / sqrt(r)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)
