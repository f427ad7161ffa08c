"""The kernel benchmark's harness runs end to end (tiny shapes, interpreter) and never fakes numbers."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_speed.py"


@pytest.fixture
def bench(monkeypatch):
    for name in ("TRITON_INTERPRET", "FLEXLLM_FORCE_TRITON"):  # main() sets them; restore afterwards
        monkeypatch.setenv(name, "1")
    spec = importlib.util.spec_from_file_location("kernels_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_checks_every_kernel_without_timings(bench, capsys):
    assert bench.main(["--smoke"]) == 0
    table = capsys.readouterr().out
    for kernel in ("rms_norm", "silu_and_mul", "lora_shrink/sgmv", "lora_expand/bgmv", "lora_fwd+bwd"):
        assert kernel in table
    assert "paged_attention/chunk" in table and " ms" in table


def test_without_gpu_writes_nothing(bench, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "kernels.json")
    assert bench.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out and not (tmp_path / "kernels.json").exists()
