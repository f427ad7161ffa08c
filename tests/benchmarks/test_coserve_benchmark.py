"""benchmarks/coserve.py compares systems one after another on one engine: each must start from the
same footing, not from a prefix cache that the previous system filled with the same trace."""

import sys
from pathlib import Path

from flexllm.worker.coserve.latency import LatencyModel
from flexllm.worker.coserve.policy import SLO
from flexllm.worker.engine.llm_engine import LLMEngine

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_each_replay_of_a_trace_computes_its_own_prompts(tiny_llama_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "coserve", raising=False)
    import coserve
    from traces import Arrival

    engine = LLMEngine(model=str(tiny_llama_dir), dtype="float32", device="cpu", num_kv_blocks=128, block_size=4)
    trace = [Arrival(0.0, 24, 2), Arrival(0.0, 20, 2)]
    for run in ("azure/1.0/coserve/4", "azure/1.0/inference-only/4"):
        row = coserve.run_system(engine, LatencyModel(), SLO(ttft_s=60, tpot_s=1), "inference-only", trace, 0.01,
                                 with_finetune=False, run=run)
        assert row["requests"] == 2
    assert engine.block_manager.query_tokens == 2 * (24 + 20)
    assert engine.block_manager.hit_tokens == 0
