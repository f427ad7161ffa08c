"""What inference wants from the next iteration: the one figure the engine gives co-serving to plan with."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flexllm.worker.engine.sequence import Sequence
from flexllm.worker.options import SLO


@dataclass(frozen=True)
class InferenceDemand:
    """What inference wants this iteration."""

    decodes: int = 0  # running sequences due one token each
    decode_context_tokens: int = 0  # their summed context lengths
    prefill_tokens: int = 0  # prompt tokens not yet computed, over all waiting/prefilling requests
    min_ttft_slack_s: float = float("inf")  # least time left before a waiting request's TTFT deadline
    min_tpot_slack_s: float = float("inf")  # least time left before a running request falls behind its TPOT pace

    @property
    def idle(self) -> bool:
        return self.decodes == 0 and self.prefill_tokens == 0


def inference_demand(seqs: Iterable[Sequence], now: float, slo: SLO) -> InferenceDemand:
    """What unfinished sequences want from the next iteration (``now`` on their arrival clock)."""
    decodes = ctx = prefill = 0
    ttft_slack = tpot_slack = float("inf")
    for seq in seqs:
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining == 1 and seq.num_output_tokens > 0:
            decodes += 1
            ctx += seq.num_tokens
        else:
            prefill += remaining
        if seq.first_token_time is None:
            ttft_slack = min(ttft_slack, seq.arrival_time + slo.ttft_s - now)
        else:  # on pace while token k+1 is out by first_token_time + k * TPOT
            pace = seq.first_token_time + slo.tpot_s * seq.num_output_tokens
            tpot_slack = min(tpot_slack, pace - now)
    return InferenceDemand(decodes, ctx, prefill, ttft_slack, tpot_slack)
