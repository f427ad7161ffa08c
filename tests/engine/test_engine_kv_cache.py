"""The KV cache is sized from the model's bytes per token, the memory available and what the
sequences can use: no fixed size."""

import psutil
import pytest

from flexllm.worker.engine.llm_engine import LLMEngine

from ..conftest import write_tiny_checkpoint


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama-4"), "llama", num_hidden_layers=4)


def engine(model_dir, **overrides) -> LLMEngine:
    return LLMEngine(model=str(model_dir), dtype="float32", device="cpu", block_size=16, **overrides)


def test_kv_cache_is_what_the_sequences_can_use_when_memory_allows(tiny_llama_dir):
    # 2 layers x 2 kv heads x 16 dims x K+V x 4 bytes = 512 bytes per token: 4 x 128 tokens is 256 KiB
    sized = engine(tiny_llama_dir, max_num_seqs=4, max_model_len=128)
    assert sized.runner.num_blocks == 4 * 128 // 16
    assert engine(tiny_llama_dir, max_num_seqs=4, max_model_len=100).runner.num_blocks == 4 * 7  # ceil(100 / 16)


def test_kv_cache_scales_with_the_models_bytes_per_token_when_memory_binds(tiny_llama_dir, four_layer_dir):
    fraction = (8 << 20) / psutil.virtual_memory().available  # about 8 MiB; 64 x 256 tokens would need more
    two = engine(tiny_llama_dir, kv_cache_fraction=fraction).runner
    four = engine(four_layer_dir, kv_cache_fraction=fraction).runner
    assert two.kv_cache.numel() * 4 == pytest.approx(8 << 20, rel=0.25)
    assert two.num_blocks / four.num_blocks == pytest.approx(2, rel=0.1)  # twice the layers, half the tokens
