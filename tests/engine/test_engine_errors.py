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
