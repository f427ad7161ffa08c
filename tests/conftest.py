"""Shared test setup: offline Hugging Face, Triton interpreter, tiny checkpoints, 2-core friendly threads."""

import os

# Triton kernels run on CPU tensors through the interpreter. It is read when @triton.jit runs, so it
# must be set before anything (transformers, peft, the kernels) imports a kernel module.
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import signal  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_SHAPES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, vocab_size=0,  # vocab from the tokenizer
)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its children; SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


ARCHITECTURES = {"llama": ("LlamaConfig", "LlamaForCausalLM", False, 10000.0),
                 "mistral": ("MistralConfig", "MistralForCausalLM", False, 10000.0),
                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", True, 1000000.0)}


def write_tiny_checkpoint(folder: Path, model_type: str, seed: int = 0, tokenizer=None, **config) -> Path:
    """A random-initialised tiny Llama, Mistral or Qwen2 checkpoint with the bundled model's tokenizer
    (or ``tokenizer``); ``config`` overrides the tiny shapes (e.g. ``sliding_window``)."""
    import transformers
    from transformers import AutoTokenizer

    from flexllm.worker.engine.loader import resolve_model

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    config_name, model_name, tied, rope_theta = ARCHITECTURES[model_type]
    settings = {**TINY_SHAPES, "vocab_size": len(tokenizer), "tie_word_embeddings": tied, "rope_theta": rope_theta,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **config}
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**settings))
    with torch.no_grad():  # larger weights than the default init, so logits are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_vocab_tokenizer(vocab_size: int = 300):
    """A real byte-level BPE tokenizer of ``vocab_size`` tokens (256 bytes, merges, <s> and </s>),
    trained here on a few sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = ["The quick brown fox jumps over the lazy dog.", "Hello, world! Tell me a story about the sea."] * 50
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    assert len(tokenizer) == vocab_size
    return tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    """A tiny Mistral with an 8-token sliding window (shorter than the test prompts)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mistral"), "mistral", sliding_window=8)


@pytest.fixture(scope="session")
def tiny_qwen2_window_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 with a 6-token sliding window on its second layer only (max_window_layers=1)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-window"), "qwen2", use_sliding_window=True,
                                 sliding_window=6, max_window_layers=1)


@pytest.fixture(scope="session")
def small_vocab_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a 300-token vocabulary and a 128-token context."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("small-vocab"), "llama", tokenizer=small_vocab_tokenizer(),
                                 max_position_embeddings=128)


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
