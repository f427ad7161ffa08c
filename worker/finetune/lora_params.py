"""Trainable LoRA weights for every (layer, target) of the engine model, in PEFT's naming."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from flexllm.worker.engine.lora_targets import peft_key
from flexllm.worker.engine.model import CausalLM
from flexllm.worker.finetune.spec import LoraSpec


class LoRAWeights(nn.Module):
    """``A`` [r, in] and ``B`` [out, r] (fp32) per layer and target; ``pairs(layer)`` -> {target: (A, B)}.

    Initialised like PEFT (A Kaiming-uniform, B zero) from ``seed``.
    """

    def __init__(self, model: CausalLM, spec: LoraSpec, seed: int):
        super().__init__()
        self.spec = spec
        self.scaling = spec.scaling
        self.num_layers = model.args.num_layers
        generator = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterDict()
        device = model.embed_tokens.weight.device
        for layer in range(self.num_layers):
            for target in spec.target_modules:
                module = model.projection(layer, target)
                start, end = module.out_slices[target]
                a = torch.empty(spec.rank, module.in_features)
                bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5))
                a.uniform_(-bound, bound, generator=generator)
                self.weights[self._name(layer, target, "A")] = nn.Parameter(a.to(device))
                self.weights[self._name(layer, target, "B")] = nn.Parameter(
                    torch.zeros(end - start, spec.rank, device=device)
                )

    @staticmethod
    def _name(layer: int, target: str, which: str) -> str:
        return f"{layer}_{target}_{which}"

    def pairs(self, layer: int) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        return {
            t: (self.weights[self._name(layer, t, "A")], self.weights[self._name(layer, t, "B")])
            for t in self.spec.target_modules
        }

    def layer_parameters(self, layer: int) -> list[nn.Parameter]:
        return [p for pair in self.pairs(layer).values() for p in pair]

    def named_peft(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(PEFT's key, weight) of every trained weight."""
        for layer in range(self.num_layers):
            for target, pair in self.pairs(layer).items():
                for which, w in zip("AB", pair, strict=True):
                    yield peft_key(layer, target, which), w

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the weights under PEFT's keys (CPU tensors)."""
        return {key: w.detach().cpu().clone() for key, w in self.named_peft()}

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named weights in (every trained weight must be present)."""
        for key, w in self.named_peft():
            w.copy_(state[key])

    def save_pretrained(self, folder: Path, base_model: str) -> None:
        """adapter_config.json + adapter_model.safetensors, loadable by ``peft.PeftModel.from_pretrained``."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        config = LoraConfig(
            r=self.spec.rank,
            lora_alpha=self.spec.alpha,
            lora_dropout=self.spec.dropout,
            use_rslora=self.spec.use_rslora,
            target_modules=list(self.spec.target_modules),
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model,
        )
        (folder / "adapter_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
        save_file(
            self.peft_state_dict(), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"}
        )
