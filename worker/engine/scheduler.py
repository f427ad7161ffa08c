"""Token-budget scheduler (vLLM v1 style): every step advances each sequence by some tokens.

A sequence needs ``num_tokens - num_computed_tokens`` more tokens: 1 while decoding, a prompt
(chunk) while prefilling. Each step fills ``token_budget`` with running decodes first, then running
prefill chunks, then new requests (continuous batching). A new request starts after the leading
blocks of its prompt that the prefix cache holds (see ``BlockManager``); a fully cached prompt still
computes its last token, whose logits are sampled. When KV blocks run out, the newest running
sequence is preempted: its blocks are freed (its computed full blocks stay cached) and it is
recomputed later, from what is still cached.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from flexllm.worker.engine.block_manager import BlockManager
from flexllm.worker.engine.lora import LoRAManager
from flexllm.worker.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """The inference part of one step: ``num_new_tokens[i]`` tokens of ``seqs[i]``."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # could not start (their adapter)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, lora_manager: LoRAManager | None,
                 max_tokens_per_batch: int, max_num_seqs: int):
        self.block_manager = block_manager
        self.lora_manager = lora_manager
        self.max_tokens_per_batch = max_tokens_per_batch
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, token_budget: int | None = None) -> ScheduledBatch:
        """Pick this step's tokens; ``token_budget`` (default ``max_tokens_per_batch``) caps them."""
        budget = self.max_tokens_per_batch if token_budget is None else token_budget
        batch = ScheduledBatch()
        # Decodes first (their TPOT is on the line), then prefill chunks, each in arrival order.
        self.running.sort(key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, s.arrival_time))
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            self.block_manager.cache_computed(seq)  # the blocks its last step completed
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + num_new, self.running[i:], batch):
                break  # seq itself was preempted
            batch.add(seq, num_new)
            budget -= num_new
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            seq = self.waiting[0]
            try:
                root = self.lora_manager.digest(seq.lora_name) if seq.lora_name is not None else b""
            except Exception as error:  # its adapter is gone: this request fails alone
                self.waiting.popleft()
                batch.failed.append((seq, error))
                continue
            hits = self.block_manager.match_prefix(seq, root)
            num_new = min(seq.num_tokens - len(hits) * self.block_manager.block_size, budget)
            num_tokens = len(hits) * self.block_manager.block_size + num_new
            if not self.block_manager.can_admit(hits, num_tokens):
                break
            if seq.lora_name is not None:
                try:
                    slot = self.lora_manager.acquire(seq.lora_name)
                except Exception as error:  # its adapter cannot be loaded: this request fails alone
                    self.waiting.popleft()
                    batch.failed.append((seq, error))
                    continue
                if slot is None:
                    break  # every adapter slot is in use by running requests
                seq.lora_slot = slot
            self.block_manager.admit(seq, hits, num_tokens)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
        return batch

    def _make_room(self, seq: Sequence, num_tokens: int, candidates: list[Sequence], batch: ScheduledBatch) -> bool:
        """Allocate blocks for ``seq``, preempting the newest not-yet-scheduled sequences among
        ``candidates`` (seq included); False if seq itself was preempted."""
        candidates = list(candidates)
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = max(candidates, key=lambda s: s.arrival_time)
            candidates.remove(victim)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence, keep_cache: bool = True) -> None:
        self.block_manager.free(seq, keep_cache)
        if seq.lora_slot >= 0:
            self.lora_manager.release(seq.lora_slot)
            seq.lora_slot = -1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of the queues and free what it holds."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq, keep_cache=reason != "error")  # a failed request's K/V may hold NaN/inf
        seq.status = Status.FINISHED
        seq.finish_reason = reason
