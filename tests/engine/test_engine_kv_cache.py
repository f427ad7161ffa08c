"""The KV cache is sized from the model's bytes per token, the memory available and what the
sequences can use: no fixed size. On CPU it costs RAM only for the blocks in use."""

import psutil
import pytest

from flexllm.worker.engine.block_manager import BlockManager
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.engine.sequence import Sequence

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


def test_a_large_cpu_cache_costs_memory_only_for_the_blocks_in_use(tiny_llama_dir):
    process = psutil.Process()
    before = process.memory_info().rss
    large = engine(tiny_llama_dir, max_num_seqs=8192, max_model_len=256, kv_cache_fraction=1.0)
    assert large.runner.kv_cache.numel() * 4 == 8192 * 256 * 512  # 1 GiB: 8192 sequences x 256 tokens x 512 B
    large.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=8, temperature=0))
    assert process.memory_info().rss - before < (256 << 20)


def test_freed_blocks_are_reused_first():
    manager = BlockManager(num_blocks=8, block_size=4)
    first, second = Sequence("a", [1] * 9, SamplingParams()), Sequence("b", [1] * 9, SamplingParams())
    manager.allocate(first, 9)
    assert first.block_table == [0, 1, 2]
    manager.free(first)
    manager.allocate(second, 9)
    assert second.block_table == [0, 1, 2] and manager.num_free_blocks == 5
