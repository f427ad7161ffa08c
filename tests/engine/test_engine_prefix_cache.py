"""Automatic prefix caching: shared KV blocks change no output, are keyed by the adapter's content
(never its name), are shared across requests, and are evicted least recently freed first, never in use."""

import shutil

import pytest
from prometheus_client import generate_latest
from safetensors.torch import load_file, save_file

from flexllm.worker.engine.block_manager import BlockManager
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.engine.sequence import Sequence
from flexllm.worker.metrics import Metrics

from .conftest import make_engine
from .test_engine_generate import hf_greedy
from .test_engine_lora import adapter_dirs, peft_greedy  # noqa: F401 (adapter_dirs is a fixture)

PREFIX = list(range(100, 123))  # 23 tokens: 5 full blocks of 4, then 3 more
GREEDY = SamplingParams(max_tokens=6, temperature=0)


def texts(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def test_shared_prefix_outputs_match_hf_and_the_engine_without_caching(tiny_llama_dir, hf_llama):
    cached = make_engine(tiny_llama_dir, max_tokens_per_batch=16, block_size=4)
    uncached = make_engine(tiny_llama_dir, max_tokens_per_batch=16, block_size=4, enable_prefix_caching=False)
    first = [PREFIX + [7]]
    followers = [PREFIX + [300 + i] * (1 + i) for i in range(5)] + [PREFIX[:20], PREFIX[:21]]  # [:20]: all cached
    for engine in (cached, uncached):
        engine.generate(first, GREEDY)
    runs = {}
    for name, engine in (("cached", cached), ("uncached", uncached)):
        turn1 = engine.generate(followers, GREEDY)
        turn2 = [p + o.token_ids + [400, 401] for p, o in zip(followers, turn1)]  # multi-turn: history is the prefix
        runs[name] = (texts(turn1), texts(engine.generate(turn2, GREEDY)), turn2)
    assert runs["cached"][:2] == runs["uncached"][:2]
    for prompt, out in zip(followers + runs["cached"][2], runs["cached"][0] + runs["cached"][1]):
        assert out == hf_greedy(hf_llama, prompt, 6)
    bm = cached.block_manager
    assert bm.hit_tokens >= 20 * len(followers) and uncached.block_manager.hit_tokens == 0
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"


def test_requests_share_the_same_cached_blocks(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, block_size=4)
    engine.generate([PREFIX + [7]], GREEDY)
    before = engine.block_manager.hit_tokens
    engine.add_request("a", PREFIX + [8, 9], GREEDY)
    engine.add_request("b", PREFIX + [10], GREEDY)
    engine.step()
    a, b = engine.requests["a"], engine.requests["b"]
    assert a.block_table[:5] == b.block_table[:5] and a.block_table[5] != b.block_table[5]
    assert all(engine.block_manager.ref_counts[block] == 2 for block in a.block_table[:5])
    assert engine.block_manager.hit_tokens - before == 2 * 20
    whole = Sequence("whole", PREFIX[:20], GREEDY)  # 5 cached blocks: the last token's must be computed
    assert engine.block_manager.match_prefix(whole, b"") == a.block_table[:4]


def test_a_new_adapter_version_gets_no_hits_from_the_previous_one(tiny_llama_dir, adapter_dirs, tmp_path):  # noqa: F811
    engine = make_engine(tiny_llama_dir, max_loras=2, max_lora_rank=8, block_size=4)
    bm, prompt = engine.block_manager, PREFIX + [7]
    engine.add_lora("job@v4", adapter_dirs["attn"])
    assert texts(engine.generate([prompt], GREEDY, lora="job@v4"))[0] == peft_greedy(
        tiny_llama_dir, adapter_dirs["attn"], prompt, 6)
    engine.add_lora("job@v5", adapter_dirs["all"])  # hot swap: v5 published, v4 retired
    engine.remove_lora("job@v4")
    hits = bm.hit_tokens
    assert texts(engine.generate([prompt], GREEDY, lora="job@v5"))[0] == peft_greedy(
        tiny_llama_dir, adapter_dirs["all"], prompt, 6)
    assert bm.hit_tokens == hits, "v5 reused KV computed under v4"
    engine.generate([prompt], GREEDY)  # the base model has its own prefix
    assert bm.hit_tokens == hits

    # Same name, new weights: no hits from the old content; the same content under another name: hits.
    changed = tmp_path / "changed"
    shutil.copytree(adapter_dirs["all"], changed)
    weights = load_file(changed / "adapter_model.safetensors")
    save_file({k: v * 2 if "lora_B" in k else v for k, v in weights.items()}, changed / "adapter_model.safetensors")
    engine.add_lora("job", adapter_dirs["all"])
    engine.generate([prompt], GREEDY, lora="job")
    assert bm.hit_tokens == hits + 20, "same content as job@v5: its KV is reused"
    engine.add_lora("job", changed)
    assert texts(engine.generate([prompt], GREEDY, lora="job"))[0] == peft_greedy(tiny_llama_dir, changed, prompt, 6)
    assert bm.hit_tokens == hits + 20, "new weights under the same name reused old KV"


def test_an_adapter_folder_changed_after_registration_fails_its_request(tiny_llama_dir, adapter_dirs, tmp_path):  # noqa: F811
    engine = make_engine(tiny_llama_dir, max_loras=2, max_lora_rank=8, block_size=4)
    folder = tmp_path / "job"
    shutil.copytree(adapter_dirs["attn"], folder)
    engine.add_lora("job", folder)
    shutil.copy(adapter_dirs["all"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    out = engine.generate([PREFIX], GREEDY, lora="job")[0]
    assert out.finish_reason == "error" and "changed since it was registered" in out.error


def test_new_content_under_a_name_in_use_waits_for_its_requests(tiny_llama_dir, adapter_dirs):  # noqa: F811
    engine = make_engine(tiny_llama_dir, max_loras=2, max_lora_rank=8, block_size=4)
    engine.add_lora("job", adapter_dirs["attn"])
    engine.add_request("r", PREFIX, GREEDY, "job")
    engine.step()
    with pytest.raises(ValueError, match="in use by running requests"):
        engine.add_lora("job", adapter_dirs["all"])
    engine.add_lora("job", adapter_dirs["attn"])  # the same content again is fine
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_lora("job", adapter_dirs["all"])
    assert texts(engine.generate([PREFIX], GREEDY, lora="job"))[0] == peft_greedy(
        tiny_llama_dir, adapter_dirs["all"], PREFIX, 6)


def start(bm: BlockManager, name: str, tokens: list[int]) -> Sequence:
    """Admit a sequence as the scheduler does and pretend all its tokens were computed."""
    seq = Sequence(name, tokens, SamplingParams())
    hits = bm.match_prefix(seq, b"")
    assert bm.can_admit(hits, len(tokens))
    bm.admit(seq, hits, len(tokens))
    seq.num_computed_tokens = len(tokens)
    bm.cache_computed(seq)
    return seq


def test_eviction_takes_the_least_recently_freed_cached_blocks_never_blocks_in_use():
    bm = BlockManager(num_blocks=6, block_size=4, enable_caching=True)
    held = start(bm, "held", list(range(9)))  # blocks 0, 1 (cached, in use) and 2
    gone = start(bm, "gone", list(range(50, 59)))  # blocks 3, 4 (cached) and 5
    assert (held.block_table, gone.block_table) == ([0, 1, 2], [3, 4, 5])
    bm.free(gone)  # 3 and 4 stay cached but evictable; 5 held no full block
    assert bm.num_free_blocks == 3
    new = Sequence("new", list(range(80, 88)), SamplingParams())
    bm.allocate(new, 8)  # the uncached block first, then the tail of "gone"
    assert new.block_table == [5, 4]
    assert bm.match_prefix(Sequence("again", list(range(50, 59)), SamplingParams()), b"") == [3]
    assert not bm.can_allocate(Sequence("big", [1] * 8, SamplingParams()), 8), "in-use blocks counted as free"
    shared = start(bm, "shared", list(range(9)))  # the last free block for its tail, held's two shared
    assert shared.block_table == [0, 1, 3] and bm.ref_counts[:2] == [2, 2] and bm.num_free_blocks == 0
    bm.free(held)
    assert bm.ref_counts[:2] == [1, 1] and bm.num_free_blocks == 1  # only held's private block 2


def test_under_memory_pressure_outputs_stay_exact_and_no_block_leaks(tiny_llama_dir, hf_llama):
    # 12 blocks of 4: room for two requests at a time, far less than every prefix seen
    engine = make_engine(tiny_llama_dir, num_kv_blocks=12, block_size=4, max_tokens_per_batch=16)
    prompts = [[200 + i] * 5 + PREFIX[: 6 + i] for i in range(6)] + [PREFIX[:14], PREFIX[:15]] * 2
    outputs = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        assert out.finish_reason == "length" and out.token_ids == hf_greedy(hf_llama, prompt, 6)
    assert engine.block_manager.hit_tokens > 0
    assert engine.block_manager.num_free_blocks == 12 and sum(engine.block_manager.ref_counts) == 0


def test_cache_counters_are_in_metrics(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, block_size=4)
    metrics = Metrics()
    metrics.prefix_cache.block_manager = engine.block_manager
    engine.generate([PREFIX + [1]], GREEDY)
    engine.generate([PREFIX + [2]], GREEDY)
    text = generate_latest(metrics.registry).decode()
    assert "flexllm_prefix_cache_queries_total 48.0" in text and "flexllm_prefix_cache_hits_total 20.0" in text


@pytest.mark.parametrize("enabled", [True, False])
def test_the_flag_turns_caching_off(tiny_llama_dir, enabled):
    engine = make_engine(tiny_llama_dir, block_size=4, enable_prefix_caching=enabled)
    engine.generate([PREFIX + [1]], GREEDY)
    engine.generate([PREFIX + [2]], GREEDY)
    assert engine.block_manager.hit_tokens == (20 if enabled else 0)
