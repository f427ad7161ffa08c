"""LoRA gradients of the token-level forward + split backward equal HF PEFT's full-sequence ones."""

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

from flexllm.worker.finetune.layer import Dropout
from flexllm.worker.finetune.spec import LoraSpec
from flexllm.worker.finetune.work import SequenceWork

SPEC = LoraSpec(rank=4, alpha=8, target_modules=ALL_TARGETS)
LENGTHS = [70, 33]
# (forward chunk size, backward token budget, backward window): whole sequence, token-sized
# windows, odd windows, and fixed 16-token windows cut into one-layer blocks by a small budget
CUTS = [(10_000, 10_000, None), (1, 3, None), (7, 5, None), (64, 2, 16)]


def run_sequences(model, lora, seqs, chunk, budget, window, dropout_p=0.0) -> float:
    """Forward in ``chunk``-token chunks, backward in units of ``budget``; returns the mean loss."""
    lora.zero_grad()
    num_targets = sum(s.num_targets for s in seqs)
    total = 0.0
    for i, seq in enumerate(seqs):
        dropout = Dropout(dropout_p, key=i) if dropout_p else None
        work = SequenceWork(model, lora, seq, 1.0 / num_targets, dropout, backward_window=window)
        while not work.forward_done:
            assert work.forward_chunk(chunk) <= chunk
        while not work.finished:
            assert work.backward_unit(budget) <= budget
        total += work.loss_sum
    return total / num_targets


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_llama_dir, tiny_qwen2_dir):
    folder = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    model, _ = engine_model(folder)
    lora = random_lora(model, SPEC)
    peft = peft_model(folder, SPEC)
    copy_into_peft(peft, lora)
    seqs = random_sequences(model.args.vocab_size, LENGTHS)
    loss = peft_loss_sum(peft, seqs) / sum(s.num_targets for s in seqs)
    loss.backward()
    return model, lora, seqs, loss.item(), peft_grads(peft, lora)


@pytest.mark.parametrize("chunk,budget,window", CUTS)
def test_gradients_match_hf_peft(setup, chunk, budget, window):
    model, lora, seqs, ref_loss, ref_grads = setup
    loss = run_sequences(model, lora, seqs, chunk, budget, window)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert max_rel_error(our_grads(lora), ref_grads) <= 1e-4
    assert all(not p.requires_grad for p in model.parameters())  # the base stays frozen


def test_dropout_gradients_do_not_depend_on_cutting(tiny_llama_dir):
    model, _ = engine_model(tiny_llama_dir)
    lora = random_lora(model, SPEC)
    seqs = random_sequences(model.args.vocab_size, [40])
    results = []
    for chunk, budget, window in [(10_000, 10_000, None), (3, 2, 8)]:
        loss = run_sequences(model, lora, seqs, chunk, budget, window, dropout_p=0.3)
        results.append((loss, {k: g.clone() for k, g in our_grads(lora).items()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert max_rel_error(grads_b, grads_a) <= 1e-4
    no_dropout = run_sequences(model, lora, seqs, 10_000, 10_000, None)
    assert abs(no_dropout - loss_a) > 1e-4  # dropout did change the computation


def test_dropout_mask_rate_and_determinism():
    x = torch.ones(64, 256)
    dropout = Dropout(0.25, key=7)
    full = dropout.apply(x, 0, layer=1, target="q_proj")
    assert (full == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(full[10:20], dropout.apply(x[10:20], 10, layer=1, target="q_proj"))
    assert not torch.equal(full, dropout.apply(x, 0, layer=1, target="v_proj"))
