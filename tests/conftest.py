"""Shared test setup: offline Hugging Face, Triton interpreter, tiny checkpoints, 2-core friendly threads."""

import os

# Triton kernels run on CPU tensors through the interpreter. It is read when @triton.jit runs, so it
# must be set before anything (transformers, peft, the kernels) imports a kernel module.
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_SHAPES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, vocab_size=0,  # vocab from the tokenizer
)


def write_tiny_checkpoint(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A random-initialised tiny Llama or Qwen2 checkpoint with the bundled model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from flexllm.worker.engine.loader import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    shapes = {**TINY_SHAPES, "vocab_size": len(tokenizer)}
    torch.manual_seed(seed)
    if model_type == "llama":
        config = LlamaConfig(**shapes, tie_word_embeddings=False, rope_theta=10000.0,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(**shapes, tie_word_embeddings=True, rope_theta=1000000.0,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so logits are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


REPO = Path(__file__).resolve().parents[1]


def kube_tool(name: str) -> Path:
    """The project's own kubectl or helm (scripts/install_kube_tools.sh), never one found on PATH.

    Missing: the test is skipped with the command that installs it, except on CI (``CI`` set), where
    no Kubernetes test may be skipped for a missing binary.
    """
    path = REPO / ".cache" / "bin" / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"no {name} at {path}: run scripts/install_kube_tools.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kubectl_binary() -> Path:
    return kube_tool("kubectl")


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    return kube_tool("helm")
