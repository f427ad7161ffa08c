"""``hf://org/name[@revision]`` model and adapter sources, resolved by ``huggingface_hub`` from a real,
pre-populated Hugging Face cache with ``HF_HUB_OFFLINE=1`` (nothing is downloaded, nothing mocked).

Resolution runs in subprocesses: ``huggingface_hub`` reads its cache location and offline switch from
the environment when it is imported, as it does for a user."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import write_tiny_checkpoint
from ..service.conftest import write_peft_adapter


def add_to_hub_cache(cache: Path, repo: str, folder: Path, commit: str, ref: str | None = "main") -> Path:
    """Lay ``folder``'s files out as the hub cache does: content-addressed blobs, a snapshot of symlinks
    per commit, refs naming commits -> the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for file in folder.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tiny_llama_dir, tmp_path_factory):
    """A hub cache with org/tiny (main and an older commit) and org/tiny-lora; -> (env, snapshots)."""
    home = tmp_path_factory.mktemp("hf-home")
    cache = home / "hub"
    older = write_tiny_checkpoint(tmp_path_factory.mktemp("older"), "llama", seed=1)
    adapter = write_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapter"))
    snapshots = {
        "main": add_to_hub_cache(cache, "org/tiny", tiny_llama_dir, "a" * 40),
        "older": add_to_hub_cache(cache, "org/tiny", older, "b" * 40, ref=None),
        "adapter": add_to_hub_cache(cache, "org/tiny-lora", adapter, "c" * 40),
    }
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return env, snapshots


def resolve(env: dict, *sources: str) -> list[str]:
    """resolve_model in a fresh process -> the resolved path or the error, per source."""
    script = (
        "import json, sys\n"
        "from flexllm.worker.engine.loader import resolve_model\n"
        "out = []\n"
        "for source in sys.argv[1:]:\n"
        "    try:\n"
        "        out.append(str(resolve_model(source)))\n"
        "    except Exception as error:\n"
        "        out.append(f'{type(error).__name__}: {error}')\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, *sources], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_hf_sources_resolve_from_the_offline_cache(hub):
    env, snapshots = hub
    resolved = resolve(env, "hf://org/tiny", f"hf://org/tiny@{'b' * 40}", "hf://org/tiny@main",
                       "hf://org/tiny-lora", "hf://org/missing", f"hf://org/tiny@{'d' * 40}", "hf://no-org")
    assert resolved[:4] == [str(snapshots["main"]), str(snapshots["older"]), str(snapshots["main"]),
                            str(snapshots["adapter"])]
    for error in resolved[4:6]:
        assert error.startswith("FileNotFoundError:") and "is not available" in error and "HF_TOKEN" in error
    assert "'hf://org/missing'" in resolved[4]
    assert resolved[6].startswith("ValueError:") and "hf://org/name" in resolved[6]


def test_generate_serves_an_hf_model_and_adapter(hub):
    env, _ = hub
    command = [sys.executable, "-m", "flexllm.worker.cli", "generate", "--device", "cpu", "--max-tokens", "4",
               "--prompt", "Hello", "--model"]
    base = subprocess.run([*command, "hf://org/tiny"], env=env, capture_output=True, text=True, timeout=120)
    lora = subprocess.run([*command, "hf://org/tiny", "--lora", "chat=hf://org/tiny-lora"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert base.returncode == 0 and lora.returncode == 0, base.stderr + lora.stderr
    assert base.stdout != lora.stdout  # the adapter (non-zero B) changes the greedy output
