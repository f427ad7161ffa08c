"""Measures the roofline cost model's efficiency factors (``costmodel.EFFICIENCY``) on a CUDA GPU.

    python benchmarks/calibrate_gpu.py [--gpu H200]

``gemm``: a large bf16 matrix product's achieved FLOP/s over the GPU's dense peak; ``hbm``: a
device-to-device copy's achieved bytes/s over the HBM bandwidth; ``pass_overhead_s``: the host time
of one forward pass of a layer stack with tiny work (launch-bound). Writes them, with what was
measured, into benchmarks/results/gpu.json (``calibration``), which ``costmodel`` then uses. Without
a GPU it says so and exits 0: it never reports numbers it did not measure.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from common import RESULTS
from costmodel import GPUS


def timed_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="H200", choices=sorted(GPUS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing calibrated")
        return 0
    gpu = GPUS[args.gpu]
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm_s = timed_ms(lambda: a @ b) / 1000
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_s = timed_ms(lambda: dst.copy_(src)) / 1000
    layers = [torch.nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(32 * 7)]
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)

    def stack() -> torch.Tensor:
        y = x
        for layer in layers:
            y = layer(y)
        return y

    pass_s = timed_ms(stack) / 1000
    calibration = {
        "device": torch.cuda.get_device_name(), "spec": args.gpu,
        "gemm": 2 * n**3 / gemm_s / gpu.bf16_flops,
        "hbm": 2 * src.numel() / copy_s / gpu.hbm_bytes_per_s,  # bytes read + written
        "pass_overhead_s": pass_s,
        "measured": {"gemm_tflops": 2 * n**3 / gemm_s / 1e12, "copy_tb_s": 2 * src.numel() / copy_s / 1e12,
                     "launch_bound_pass_ms": pass_s * 1000, "kernels_per_pass": len(layers)},
    }
    path = RESULTS / "gpu.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**existing, "calibration": calibration}, indent=2) + "\n")
    print(json.dumps(calibration, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
