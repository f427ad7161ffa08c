"""Bad input gets a clear error and the engine keeps serving the other requests."""

import json

import pytest

from flexllm.worker.engine.loader import resolve_model
from flexllm.worker.engine.sampling import SamplingParams

from .conftest import make_engine


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, max_model_len=64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(logprobs=99), "logprobs"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_fail_alone_while_others_are_served(engine):
    good = SamplingParams(max_tokens=5, temperature=0)
    engine.add_request("ok-1", [10, 11, 12], good)
    with pytest.raises(ValueError, match="exceeds the model context of 64"):
        engine.add_request("long", list(range(100, 170)), good)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], good)
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_request("bad-ids", [10**9], good)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok-1", [1, 2], good)
    engine.add_request("ok-2", [20, 21], good)
    assert engine.abort("ok-2")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(done) == ["ok-1"] and len(done["ok-1"].token_ids) == 5
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_unsupported_architecture_names_the_supported_ones(tiny_llama_dir, tmp_path):
    for f in tiny_llama_dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        make_engine(tmp_path)


def test_missing_model_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="bundled name"):
        resolve_model("file:///nowhere/model")


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(seed=2**64), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
])
def test_parameters_that_cannot_give_finite_probabilities_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_edge_parameters_sample_valid_tokens(engine):
    """A positive but tiny temperature samples greedily (the limit of its distribution); a tiny top_p
    keeps the top token; extreme seeds and temperatures give tokens, not an error."""
    prompt = [10, 11, 12, 13]
    greedy = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    edge = [SamplingParams(max_tokens=6, temperature=1e-30), SamplingParams(max_tokens=6, temperature=1e-30, seed=1),
            SamplingParams(max_tokens=6, temperature=0.7, top_p=1e-30, seed=2),
            SamplingParams(max_tokens=6, temperature=0.7, top_p=5e-324, seed=3)]  # 0 in float32 (found by fuzzing)
    outs = engine.generate([prompt] * 4, edge)
    assert [o.token_ids for o in outs] == [greedy] * 4 and all(o.error is None for o in outs)
    wild = [SamplingParams(max_tokens=6, temperature=1e6, seed=2**64 - 1),
            SamplingParams(max_tokens=6, temperature=1e-5, top_k=10**9, seed=-(2**63))]
    outs = engine.generate([prompt] * 2, wild)
    vocab = engine.model.args.vocab_size
    assert all(o.finish_reason == "length" and all(0 <= t < vocab for t in o.token_ids) for o in outs)


def write_nan_adapter(model_dir, folder):
    """A PEFT adapter whose lora_B weights are NaN, as a diverged fine-tuning run would publish."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.service.conftest import write_peft_adapter

    write_peft_adapter(model_dir, folder)
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in state.items()}, weights)
    return folder


def test_non_finite_logits_fail_only_their_request(tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, max_model_len=64, max_loras=1, max_lora_rank=4)
    engine.add_lora("diverged", write_nan_adapter(tiny_llama_dir, tmp_path / "nan"))
    params = SamplingParams(max_tokens=8, temperature=0)
    alone = engine.generate([[10, 11, 12, 13]], params)[0].token_ids
    engine.add_request("nan-greedy", [10, 11, 12, 13], params, "diverged")
    engine.add_request("good", [10, 11, 12, 13], params)
    engine.add_request("nan-sampled", [20, 21], SamplingParams(max_tokens=8, temperature=0.8, seed=3), "diverged")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    for rid in ("nan-greedy", "nan-sampled"):
        assert done[rid].finish_reason == "error" and "non-finite logits" in done[rid].error
    assert done["good"].error is None and done["good"].token_ids == alone
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.generate([[10, 11, 12, 13]], params)[0].token_ids == alone  # the engine goes on


def test_an_adapter_that_cannot_be_loaded_fails_only_its_request(tiny_llama_dir, tmp_path):
    """The adapter's weights file is truncated on the shared volume after it was registered: loading it
    into a slot fails when its request is scheduled; the request fails, the batch goes on."""
    from tests.service.conftest import write_peft_adapter

    engine = make_engine(tiny_llama_dir, max_model_len=64, max_loras=1, max_lora_rank=4)
    folder = write_peft_adapter(tiny_llama_dir, tmp_path / "truncated")
    engine.add_lora("truncated", folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    params = SamplingParams(max_tokens=6, temperature=0)
    alone = engine.generate([[10, 11, 12]], params)[0].token_ids
    engine.add_request("good-1", [10, 11, 12], params)
    engine.add_request("broken", [10, 11, 12], params, "truncated")
    engine.add_request("good-2", [10, 11, 12], params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done["broken"].finish_reason == "error" and done["broken"].error
    assert done["good-1"].token_ids == done["good-2"].token_ids == alone
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.lora_manager.pins == [0]
