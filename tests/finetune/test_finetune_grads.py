"""LoRA gradients of the token-level forward + split backward equal HF PEFT's full-sequence ones."""

import itertools
import math

import pytest
import torch
from finetune_helpers import (
    ALL_TARGETS,
    copy_into_peft,
    engine_model,
    max_rel_error,
    our_grads,
    peft_grads,
    peft_loss_sum,
    peft_model,
    random_lora,
    random_sequences,
)

from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.finetune.layer import Dropout
from flexllm.worker.finetune.spec import LoraSpec
from flexllm.worker.finetune.work import BatchWork

SPEC = LoraSpec(rank=4, alpha=8, target_modules=ALL_TARGETS)
BATCHES = [[70, 33], [2, 41, 9, 5]]  # micro-batches (sequence lengths), packed into one stream each
# (forward budget, backward budget, window): the whole stream in one tail unit; forward chunks,
# a 16-token tail unit, then whole-stream windows; token-sized units; odd sizes; 16-token windows
# cut into one-layer blocks by a small budget; changing budgets that split spans in progress
CUTS = [
    (10_000, 10_000, None),
    (10_000, 10_000, 16),
    (1, 3, None),
    (7, 5, None),
    (64, 2, 16),
    ((9, 1, 4), (6, 1, 2), 24),
]


def run_batches(model, lora, batches, forward, backward, window, dropout_p=0.0) -> float:
    """Each micro-batch in units of the ``forward``/``backward`` budgets (an int, or a tuple of
    budgets taken in turn); returns the mean loss."""
    budgets = {
        kind: itertools.cycle(b if isinstance(b, tuple) else (b,))
        for kind, b in (("forward", forward), ("backward", backward))
    }
    lora.zero_grad()
    num_targets = sum(s.num_targets for seqs in batches for s in seqs)
    total = 0.0
    for i, seqs in enumerate(batches):
        keys = [10 * i + j for j in range(len(seqs))]
        work = BatchWork(model, lora, seqs, 1.0 / num_targets, dropout_p, keys, window)
        while not work.finished:
            budget = next(budgets["backward" if work.next_is_backward else "forward"])
            cost, _ = work.unit(budget)
            least = math.ceil((1 + work.head_layers) / work.num_layers)  # one token, one layer, its loss
            assert 0 < cost <= max(budget, least)
        total += work.loss_sum
    return total / num_targets


def sequences(vocab: int, batches: list[list[int]]):
    seqs = iter(random_sequences(vocab, [n for lengths in batches for n in lengths]))
    return [[next(seqs) for _ in lengths] for lengths in batches]


def checkpoint(arch: str, request) -> object:
    """The tiny checkpoint of ``arch``: mistral has an 8-token sliding window on every layer, qwen2-window
    a 6-token one on its second layer, both shorter than most training sequences."""
    return request.getfixturevalue(f"tiny_{arch.replace('-', '_')}_dir")


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "qwen2-window"])
def setup(request):
    folder = checkpoint(request.param, request)
    model, _ = engine_model(folder)
    lora = random_lora(model, SPEC)
    peft = peft_model(folder, SPEC)
    copy_into_peft(peft, lora)
    batches = sequences(model.args.vocab_size, BATCHES)
    seqs = [s for batch in batches for s in batch]
    loss = peft_loss_sum(peft, seqs) / sum(s.num_targets for s in seqs)
    loss.backward()
    return model, lora, batches, loss.item(), peft_grads(peft, lora)


@pytest.mark.parametrize("forward,backward,window", CUTS)
def test_gradients_match_hf_peft(setup, forward, backward, window):
    model, lora, batches, ref_loss, ref_grads = setup
    loss = run_batches(model, lora, batches, forward, backward, window)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert max_rel_error(our_grads(lora), ref_grads) <= 1e-4
    assert all(not p.requires_grad for p in model.parameters())  # the base stays frozen


def test_units_span_sequences_and_fill_the_budget(tiny_llama_dir):
    model, _ = engine_model(tiny_llama_dir)
    lora = random_lora(model, SPEC)
    (seqs,) = sequences(model.args.vocab_size, [[6] * 12])
    work = BatchWork(model, lora, seqs, 1.0, window=32, head_layers=0)  # groups of 5, 5 and 2 whole sequences
    assert work.unit(32) == (30, "backward")  # 5 sequences forward and backward in one unit
    assert work.unit(1) == (1, "forward")  # a 1-token budget: one layer of a 2-token span
    assert work.unit(5) == (1, "forward")  # that span's other layer
    assert work.forward_pos == 32
    assert work.unit(4) == (4, "forward")  # one layer of an 8-token span
    assert work.unit(1) == (1, "forward")  # a smaller budget splits it: its first 2 tokens go on
    assert work.forward_pos == 34


def test_the_loss_counts_in_the_cost_of_units_at_the_top(tiny_llama_dir):
    model, _ = engine_model(tiny_llama_dir)
    lora = random_lora(model, SPEC)
    (seqs,) = sequences(model.args.vocab_size, [[6, 6]])  # 12 tokens, 8 of them with a target
    work = BatchWork(model, lora, seqs, 1.0, window=32, head_layers=3.0)  # a target's loss: 3 layers' worth
    assert work.unit(23) == (12, "forward")  # a tail unit would cost (12 * 2 + 8 * 3) / 2 = 24
    assert work.unit(23) == (18, "backward")  # the top layer (12) and the loss (24), over 2 layers
    assert work.unit(23) == (6, "backward")  # the bottom layer
    assert work.finished
    assert BatchWork(model, lora, seqs, 1.0, window=32, head_layers=3.0).unit(24) == (24, "backward")


def test_dropout_gradients_do_not_depend_on_cutting(tiny_llama_dir):
    model, _ = engine_model(tiny_llama_dir)
    lora = random_lora(model, SPEC)
    batches = sequences(model.args.vocab_size, [[40, 7]])
    results = []
    for forward, backward, window in [(10_000, 10_000, None), (3, 2, 8)]:
        loss = run_batches(model, lora, batches, forward, backward, window, dropout_p=0.3)
        results.append((loss, {k: g.clone() for k, g in our_grads(lora).items()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert max_rel_error(grads_b, grads_a) <= 1e-4
    no_dropout = run_batches(model, lora, batches, 10_000, 10_000, None)
    assert abs(no_dropout - loss_a) > 1e-4  # dropout did change the computation


def test_dropout_mask_rate_and_determinism():
    x = torch.ones(64, 256)
    keys, positions = torch.full((64,), 7), torch.arange(64)
    full = Dropout(0.25, keys, positions).apply(x, layer=1, target="q_proj")
    assert (full == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    part = Dropout(0.25, keys[10:20], positions[10:20]).apply(x[10:20], layer=1, target="q_proj")
    assert torch.equal(full[10:20], part)  # a function of (key, position), not of the chunk
    assert not torch.equal(full, Dropout(0.25, keys, positions).apply(x, layer=1, target="v_proj"))
    assert not torch.equal(full, Dropout(0.25, keys + 1, positions).apply(x, layer=1, target="q_proj"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_units_riding_inference_forwards_match_hf_peft_and_leave_inference_unchanged(arch, request):
    """Every unit's layers run inside an inference forward (shared GEMMs, engine.fused): the gradients
    still equal HF PEFT's and the requests still generate what they generate alone."""
    folder = checkpoint(arch, request)
    engine = LLMEngine(model=str(folder), dtype="float32", device="cpu", num_kv_blocks=128, block_size=4,
                       max_tokens_per_batch=16)
    prompts = [[5 + i] * (3 + 4 * i) for i in range(4)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    alone = [out.token_ids for out in engine.generate(prompts, params)]

    lora = random_lora(engine.model, SPEC)
    peft = peft_model(folder, SPEC)
    copy_into_peft(peft, lora)
    batches = sequences(engine.model.args.vocab_size, BATCHES)
    seqs = [s for batch in batches for s in batch]
    num_targets = sum(s.num_targets for s in seqs)
    ref_loss = peft_loss_sum(peft, seqs) / num_targets
    ref_loss.backward()

    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    outputs, fused, loss, trained = {}, {"forward": 0, "backward": 0}, 0.0, 0.0
    for i, batch_seqs in enumerate(batches):
        work = BatchWork(engine.model, lora, batch_seqs, 1.0 / num_targets, 0.0, [10 * i + j for j in
                                                                                  range(len(batch_seqs))], 16)
        while not work.finished:
            unit = work.plan(5 if work.next_is_backward else 7)
            batch = engine.scheduler.schedule()
            fused[unit.kind] += bool(batch.seqs)
            outputs.update((out.request_id, out.token_ids) for out in engine.execute(batch, [unit]))
            work.finish(unit)
            trained += unit.trained
        loss += work.loss_sum / num_targets
    while engine.has_unfinished_requests():
        outputs.update((out.request_id, out.token_ids) for out in engine.step())
    assert fused["forward"] > 0 and fused["backward"] > 0
    assert trained == pytest.approx(sum(len(s) for s in seqs))  # each token counted once, forward + backward
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == alone
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    assert max_rel_error(our_grads(lora), peft_grads(peft, lora)) <= 1e-4
