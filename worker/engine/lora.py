"""Multi-LoRA serving: adapters in the PEFT format loaded into stacked slots, LRU-evicted.

Each ``LoRALinear`` of the model holds, per target module name, ``lora_a`` [S, R, in],
``lora_b`` [S, out, R] and ``lora_scaling`` [S] for ``S = max_loras`` slots of rank ``R =
max_lora_rank`` (smaller ranks are zero-padded). A request's tokens carry its slot index.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from flexllm.worker.engine.lora_targets import LORA_TARGETS, canonical_targets, lora_scaling, parse_peft_key
from flexllm.worker.engine.model import CausalLM
from flexllm.worker.names import split_version


class UnknownAdapterError(KeyError):
    """A request named an adapter that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    @classmethod
    def read(cls, folder: Path) -> AdapterConfig:
        path = folder / "adapter_config.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder} is not a PEFT adapter: adapter_config.json is missing")
        raw = json.loads(path.read_text())
        if raw.get("rank_pattern") or raw.get("alpha_pattern"):
            raise ValueError(f"{folder}: per-module rank_pattern/alpha_pattern is not supported")
        targets = raw.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        try:
            targets = canonical_targets(targets)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None
        return cls(int(raw["r"]), float(raw.get("lora_alpha", raw["r"])), targets, bool(raw.get("use_rslora", False)))


def _content_digest(folder: Path, config: AdapterConfig) -> tuple[bytes, bytes]:
    """-> (the adapter's weight file, a SHA-256 of that file and of ``config``): what it computes,
    whatever its name."""
    data = (folder / "adapter_model.safetensors").read_bytes()
    return data, hashlib.sha256(repr(config).encode() + data).digest()


class LoRAManager:
    """Registered adapters (name -> folder) and ``max_loras`` device slots with LRU eviction.

    Each registration records the content digest of the adapter (``digest``), which keys the KV
    prefix cache: KV computed under one adapter content is never reused under another, whatever
    the names."""

    def __init__(self, model: CausalLM, max_loras: int, max_lora_rank: int):
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        # target -> its projection in each layer
        self.targets = {t: [model.projection(i, t) for i in range(model.args.num_layers)] for t in LORA_TARGETS}
        self.registry: dict[str, tuple[Path, AdapterConfig, bytes]] = {}  # name -> folder, config, digest
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # loaded adapters, least recently used first
        self.pins = [0] * max_loras
        self.slot_digests: list[bytes | None] = [None] * max_loras  # content digest of what each slot holds
        param = model.embed_tokens.weight
        for name, modules in self.targets.items():
            for module in modules:
                start, end = module.out_slices[name]
                module.lora_a[name] = param.new_zeros(max_loras, max_lora_rank, module.in_features)
                module.lora_b[name] = param.new_zeros(max_loras, end - start, max_lora_rank)
                module.lora_scaling[name] = param.new_zeros(max_loras)

    def register(self, name: str, folder: str | Path) -> AdapterConfig:
        """Make ``name`` servable from a PEFT folder; checks its config now, loads on first use."""
        split_version(name)  # the naming rule, with an optional @vN
        folder = Path(folder)
        config = AdapterConfig.read(folder)
        if config.rank > self.max_lora_rank:
            raise ValueError(f"adapter {name!r} has rank {config.rank} > max_lora_rank {self.max_lora_rank}")
        if not (folder / "adapter_model.safetensors").exists():
            raise FileNotFoundError(f"{folder}: adapter_model.safetensors is missing")
        _, digest = _content_digest(folder, config)
        slot = self.slot_of.get(name)
        if slot is not None and self.slot_digests[slot] != digest:  # new content under a loaded name
            if self.pins[slot]:
                raise ValueError(f"adapter {name!r} is in use by running requests: its content cannot change "
                                 f"until they finish")
            del self.slot_of[name]
        self.registry[name] = (folder, config, digest)
        return config

    def unregister(self, name: str) -> None:
        self.registry.pop(name, None)
        slot = self.slot_of.get(name)
        if slot is not None and self.pins[slot] == 0:
            del self.slot_of[name]

    def check(self, name: str) -> None:
        if name not in self.registry:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded; known: {sorted(self.registry)}")

    def digest(self, name: str) -> bytes:
        """The content digest of the registered adapter ``name``."""
        self.check(name)
        return self.registry[name][2]

    def acquire(self, name: str) -> int | None:
        """Pin ``name`` into a slot (loading it, evicting the LRU unpinned one); None if all are pinned."""
        self.check(name)
        slot = self.slot_of.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._load(name, slot)
            self.slot_of[name] = slot
        self.slot_of.move_to_end(name)
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.pins[slot] -= 1

    def _free_slot(self) -> int | None:
        used = set(self.slot_of.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        for name, slot in self.slot_of.items():  # least recently used first
            if self.pins[slot] == 0:
                del self.slot_of[name]
                return slot
        return None

    def _load(self, name: str, slot: int) -> None:
        from safetensors.torch import load

        folder, config, registered = self.registry[name]
        data, digest = _content_digest(folder, config)
        if digest != registered:  # the KV cache is keyed by what was registered
            raise ValueError(f"adapter {name!r}: {folder} changed since it was registered; register it again")
        weights = load(data)
        for target, modules in self.targets.items():
            for module in modules:
                module.lora_a[target][slot].zero_()
                module.lora_b[target][slot].zero_()
                module.lora_scaling[target][slot] = config.scaling if target in config.target_modules else 0.0
        r = config.rank
        for key, tensor in weights.items():
            parsed = parse_peft_key(key)
            if parsed is None:
                raise ValueError(f"adapter {name!r}: unexpected weight {key!r}")
            layer, target, which = parsed
            module = self.targets[target][layer]
            if which == "A":  # [r, in]
                module.lora_a[target][slot, :r].copy_(tensor)
            else:  # [out, r]
                module.lora_b[target][slot, :, :r].copy_(tensor)
        self.slot_digests[slot] = digest
