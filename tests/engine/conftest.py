"""Engine fixtures: tiny engines and the matching Hugging Face reference models."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexllm.worker.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


DEVICE = os.environ.get("FLEXLLM_TEST_DEVICE", "cpu")  # benchmarks/gpu_check.sh runs the parity tests on cuda


def make_engine(model_dir, **overrides) -> LLMEngine:
    settings = dict(model=str(model_dir), dtype="float32", device=DEVICE, num_kv_blocks=256, block_size=4)
    return LLMEngine(**{**settings, **overrides})


def prompts_of_mixed_lengths(count: int, seed: int = 0, vocab: int = 1000) -> list[list[int]]:
    """Token-id prompts of 3 to 40 tokens (ids above the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 41, (count,), generator=g).tolist()
    return [torch.randint(100, vocab, (n,), generator=g).tolist() for n in lengths]
