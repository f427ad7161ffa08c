"""Job spec parsing, JSONL formats and validation, resumable streaming."""

import json

import pytest
from finetune_helpers import write_dataset
from pydantic import ValidationError
from transformers import AutoTokenizer

from flexllm.worker.engine.loader import resolve_model
from flexllm.worker.finetune.data import DataPosition, DatasetError, SequenceStream, encode_line
from flexllm.worker.finetune.spec import DatasetSpec, FinetuneJobSpec


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def test_spec_parses_the_crs_camel_case_with_defaults():
    spec = FinetuneJobSpec.model_validate({
        "inferenceService": "svc", "dataset": {"source": "data/train.jsonl", "format": "chat"},
        "lora": {"rank": 16, "targetModules": ["v_proj", "q_proj"]},
        "training": {"epochs": 2, "gradientAccumulation": 4},
    })
    assert spec.lora.target_modules == ("q_proj", "v_proj") and spec.lora.scaling == 1.0
    assert spec.training.optimizer == "adamw" and spec.training.batch_tokens == 2048
    assert spec.publish.every_steps == 50 and spec.publish.keep_versions == 5
    with pytest.raises(ValidationError, match="exactly one"):
        FinetuneJobSpec.model_validate({"dataset": {"source": "x"}, "training": {"maxSteps": 1, "epochs": 1}})
    with pytest.raises(ValidationError, match="unsupported target"):
        FinetuneJobSpec.model_validate(
            {"dataset": {"source": "x"}, "lora": {"targetModules": ["lm_head"]}, "training": {"maxSteps": 1}})


def test_dataset_source_stays_under_the_roots(tmp_path):
    inside = tmp_path / "x.jsonl"
    assert DatasetSpec(source=str(inside)).resolve([tmp_path]) == inside.resolve()
    assert DatasetSpec(source=f"file://{inside}").resolve([tmp_path]) == inside.resolve()
    for bad in (str(tmp_path / ".." / "secret.jsonl"), f"file://{tmp_path}/a/../../secret.jsonl", "/etc/passwd"):
        with pytest.raises(ValueError, match="must be files under the data roots"):
            DatasetSpec(source=bad).resolve([tmp_path])


def test_formats_mask_the_loss(tokenizer):
    seq, _ = encode_line(json.dumps({"prompt": "Hi", "completion": " there"}), "prompt-completion",
                         tokenizer, 64, 1)
    prompt = tokenizer.encode("Hi")
    assert seq.token_ids[-1] == tokenizer.eos_token_id
    assert seq.is_target == (False,) * len(prompt) + (True,) * (len(seq) - len(prompt))
    text, _ = encode_line(json.dumps({"text": "Hello world"}), "text", tokenizer, 64, 1)
    assert all(text.is_target)
    chat = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                         {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}
    seq, _ = encode_line(json.dumps(chat), "chat", tokenizer, 512, 1)
    rendered = tokenizer.apply_chat_template(chat["messages"], tokenize=True, return_dict=False)
    assert list(seq.token_ids) == rendered
    targets = tokenizer.decode([t for t, m in zip(seq.token_ids, seq.is_target, strict=True) if m])
    assert "4" in targets and "6" in targets and "2+2" not in targets and "3+3" not in targets


def test_long_sequences_are_truncated(tokenizer):
    seq, truncated = encode_line(json.dumps({"text": "word " * 100}), "text", tokenizer, 16, 1)
    assert truncated and len(seq) == 16
    with pytest.raises(ValueError, match="no loss tokens"):
        long_prompt = json.dumps({"prompt": "word " * 100, "completion": "x"})
        encode_line(long_prompt, "prompt-completion", tokenizer, 16, 1)


def test_bad_lines_are_counted_and_an_all_bad_file_fails(tokenizer, tmp_path):
    path = write_dataset(tmp_path / "d.jsonl", lines=3, bad=("{oops", "[1, 2]", '{"prompt": "p"}'))
    stream = SequenceStream(path, "prompt-completion", tokenizer, 64)
    batch = stream.micro_batch(3 * 19)  # the three 19-token lines
    assert [s.line for s in batch] == [1, 5, 6] and stream.stats.bad == 3
    assert stream.stats.first_error.startswith("line 2: invalid JSON")
    (tmp_path / "bad.jsonl").write_text('{"text": ""}\nnot json\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl.*no valid line.*line 1: field 'text'"):
        SequenceStream(tmp_path / "bad.jsonl", "text", tokenizer, 64).micro_batch(100)
    with pytest.raises(DatasetError, match="does not exist"):
        SequenceStream(tmp_path / "missing.jsonl", "text", tokenizer, 64)


def test_stream_resumes_from_its_position_across_epochs(tokenizer, tmp_path):
    path = write_dataset(tmp_path / "d.jsonl", lines=5)
    stream = SequenceStream(path, "prompt-completion", tokenizer, 64)
    lines = [[s.line for s in stream.micro_batch(40)] for _ in range(3)]
    position = stream.position
    later = [[s.line for s in stream.micro_batch(40)] for _ in range(4)]
    resumed = SequenceStream(path, "prompt-completion", tokenizer, 64, DataPosition(**vars(position)))
    assert [[s.line for s in resumed.micro_batch(40)] for _ in range(4)] == later
    assert sum(len(b) for b in lines + later) > 5  # wrapped into a second epoch


