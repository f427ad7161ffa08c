"""What a FinetuneJob costs in memory when co-served, against a separate fine-tuning process.

Measured here (peak RSS, each case its own process, the bundled model in fp32 on the CPU):
``serving`` (an engine serving requests), ``coserved`` (the same engine co-serving a job: the job
adds its LoRA weights, optimizer state, activations at the scheduled budget and its share of
buffers) and ``separate`` (a fine-tuning process alone: its own copy of the base weights and the
rest). Computed for the GPU models of the simulator from the same parts (bf16 weights; LoRA in
fp32 with AdamW: weights, gradients and two moments; activations at the measured bytes per token of
``memory.json``). ``coserved_job_memory_vs_separate`` = (coserved - serving) / separate.

    python benchmarks/job_memory.py   # writes results/job_memory.json and adds its keys to memory.json

(``memory.py`` runs it too, after measuring the bytes per token it starts from; alone it takes those
from the ``memory.json`` already there.)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import RESULTS, machine, write_json
from costmodel import MODELS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
JOB = {
    "dataset": {"source": str(ROOT / "examples/data/tiny.jsonl"), "format": "prompt-completion"},
    "lora": {"rank": 16, "alpha": 32, "targetModules": ["q_proj", "v_proj"]},
    "training": {"maxSteps": 6, "learningRate": 1e-4, "batchTokens": 256, "maxSeqLen": 128},
    "publish": {"everySteps": 1000, "keepVersions": 1},
}
LORA_BYTES_PER_PARAM = 4 * 4  # fp32 weights, gradients, AdamW's two moments
RUNTIME_CONTEXT_BYTES = 0.5e9  # a GPU process's CUDA context and allocator reserve (assumed; not measured here)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(case: str) -> int:
    """One case in this process; returns its peak RSS."""
    from flexllm.worker.coserve.engine import CoServingEngine
    from flexllm.worker.coserve.policy import SLO
    from flexllm.worker.engine.llm_engine import LLMEngine, build_model
    from flexllm.worker.engine.sampling import SamplingParams
    from flexllm.worker.finetune.runner import FinetuneRunner
    from flexllm.worker.finetune.spec import FinetuneJobSpec

    spec = FinetuneJobSpec.model_validate(JOB)
    with tempfile.TemporaryDirectory() as adapters:
        if case == "separate":
            model, tokenizer, _, _ = build_model("smollm2-135m", torch.float32, torch.device("cpu"))
            runner = FinetuneRunner(model, tokenizer, spec, Path(adapters), "mem", resume=False, data_roots=[DATA])
            while not runner.done:
                runner.run_work(256)
            return peak_rss_bytes()
        engine = LLMEngine(model="smollm2-135m", dtype="float32", device="cpu", num_kv_blocks=512)
        co = CoServingEngine(engine, SLO(10.0, 1.0))
        if case == "coserved":
            co.add_job("mem", FinetuneRunner(engine.model, engine.tokenizer, spec, Path(adapters), "mem",
                                             resume=False, data_roots=[DATA]))
        for i in range(8):
            engine.add_request(f"r{i}", [100 + i] * 64, SamplingParams(max_tokens=32, ignore_eos=True))
        while co.has_work():
            co.step()
        return peak_rss_bytes()


def measured() -> dict:
    """Peak RSS of each case in a process of its own."""
    rss = {}
    for case in ("serving", "coserved", "separate"):
        out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        rss[case] = int(out.stdout.strip().splitlines()[-1])
    job = rss["coserved"] - rss["serving"]
    return {"peak_rss_bytes": rss, "coserved_job_bytes": job, "ratio": job / rss["separate"]}


def computed(flexllm_kib_per_token: float, batch_tokens: int = 4096) -> dict:
    """For each simulator model: the co-served job's parts and a separate process's, in bytes."""
    out = {}
    for key, m in MODELS.items():
        lora = m.layers * m.lora_params_per_layer * LORA_BYTES_PER_PARAM
        activations = flexllm_kib_per_token * 1024 * batch_tokens
        coserved = lora + activations
        separate = m.params * m.bytes_per_param + lora + activations + RUNTIME_CONTEXT_BYTES
        out[key] = {"model": m.name, "lora_and_optimizer_bytes": lora, "activation_bytes": activations,
                    "coserved_job_bytes": coserved, "separate_process_bytes": separate, "ratio": coserved / separate}
    return out


def job_memory(flexllm_kib_per_token: float) -> dict:
    local = measured()
    gpu = computed(flexllm_kib_per_token)
    return {"coserved_job_memory_vs_separate": max([local["ratio"], *(g["ratio"] for g in gpu.values())]),
            "job_memory": {"measured_here": local, "computed_gpu": gpu,
                           "assumptions": {"runtime_context_bytes": RUNTIME_CONTEXT_BYTES,
                                           "lora_bytes_per_param": LORA_BYTES_PER_PARAM}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["serving", "coserved", "separate"])
    parser.add_argument("--kib-per-token", type=float,
                        help="FlexLLM's activation KiB per token (default: memory.json's flexllm_bytes_per_token)")
    args = parser.parse_args()
    if args.case:
        print(run_case(args.case))
        return
    memory_json = RESULTS / "memory.json"
    memory = json.loads(memory_json.read_text()) if memory_json.exists() else None
    if args.kib_per_token is None and memory is None:
        parser.error(f"no {memory_json}: run benchmarks/memory.py, or pass --kib-per-token")
    from_memory_json = args.kib_per_token is None
    kib_per_token = memory["flexllm_bytes_per_token"] / 1024 if from_memory_json else args.kib_per_token
    result = job_memory(kib_per_token)
    print(json.dumps(result, indent=2))
    print(f"wrote {write_json('job_memory', result)}")
    if from_memory_json:  # computed from memory.json's own figure: it belongs there
        memory.update(result, job_memory_machine=machine())
        memory_json.write_text(json.dumps(memory, indent=2) + "\n")
        print(f"added coserved_job_memory_vs_separate to {memory_json}")


if __name__ == "__main__":
    main()
