"""Token-budget scheduling on sequences alone (no model)."""

from flexllm.worker.engine.block_manager import BlockManager
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.engine.scheduler import Scheduler
from flexllm.worker.engine.sequence import Sequence


def make(num_blocks=64, budget=16, max_seqs=8):
    return Scheduler(BlockManager(num_blocks, 4), None, budget, max_seqs)


def advance(batch):
    """Pretend the model ran: computed tokens move on, due sequences get one new token."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1)


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    sched = make(budget=16)
    a = Sequence("a", list(range(10)), SamplingParams())
    sched.add(a)
    advance(sched.schedule())  # a: prefill 10, now decoding
    b = Sequence("b", list(range(40)), SamplingParams())
    sched.add(b)
    chunks = []
    for _ in range(4):
        batch = sched.schedule()
        assert batch.num_tokens <= 16
        assert batch.seqs[0] is a and batch.num_new_tokens[0] == 1, "decode first"
        chunks.append(dict(zip([s.request_id for s in batch.seqs], batch.num_new_tokens)).get("b", 0))
        advance(batch)
    assert chunks == [15, 15, 10, 1]


def test_explicit_budget_caps_the_step():
    sched = make(budget=64)
    for i in range(4):
        sched.add(Sequence(str(i), list(range(20)), SamplingParams()))
    assert sched.schedule(token_budget=7).num_tokens == 7


def test_preemption_frees_blocks_and_requeues_newest():
    sched = make(num_blocks=6, budget=64)  # 24 token slots
    old = Sequence("old", list(range(11)), SamplingParams())
    new = Sequence("new", list(range(11)), SamplingParams())
    sched.add(old)
    sched.add(new)
    advance(sched.schedule())  # 3 + 3 blocks: pool full
    for _ in range(2):
        batch = sched.schedule()
        advance(batch)
    assert [s.request_id for s in batch.preempted] == ["new"]
    assert new.num_computed_tokens == 0 and new.block_table == [] and sched.waiting[0] is new
    assert sched.block_manager.num_free_blocks + len(old.block_table) == 6
