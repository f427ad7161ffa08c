"""The engine: ``add_request`` / ``step`` / ``abort`` for the serving loop, ``generate`` offline."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flexllm.worker.engine.block_manager import BlockManager
from flexllm.worker.engine.config import EngineConfig
from flexllm.worker.engine.demand import InferenceDemand, inference_demand
from flexllm.worker.engine.detokenizer import IncrementalDetokenizer, find_stop
from flexllm.worker.engine.fused import Rider, run_rider
from flexllm.worker.engine.loader import load_checkpoint, resolve_model, resolve_source
from flexllm.worker.engine.lora import LoRAManager
from flexllm.worker.engine.model import CausalLM, ModelArgs
from flexllm.worker.engine.model_runner import ModelRunner
from flexllm.worker.engine.outputs import RequestOutput
from flexllm.worker.engine.sampling import SamplingError, SamplingParams, sample
from flexllm.worker.engine.scheduler import ScheduledBatch, Scheduler
from flexllm.worker.engine.sequence import Sequence
from flexllm.worker.options import SLO

log = logging.getLogger(__name__)
RiderPlan = Callable[[ScheduledBatch], Seq[Rider]]  # a scheduled batch -> the fine-tuning work to fuse into it


class RidersFailed(Exception):
    """A forward with fine-tuning riders fused in failed; the batch then ran alone: its ``outputs``."""

    def __init__(self, error: Exception, outputs: list[RequestOutput]):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error, self.outputs = error, outputs


def build_model(source: str, dtype: torch.dtype, device: torch.device):
    """Model source -> (CausalLM on device, tokenizer, HF config, resolved path)."""
    path = resolve_model(source)
    hf_config, state, tokenizer = load_checkpoint(path)
    args = ModelArgs.from_hf_config(hf_config)
    with torch.device("meta"):
        model = CausalLM(args, hf_config)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = model.rotary.__class__(hf_config, args.head_dim).to(device)  # fp32 inv_freq
    model.load_hf_state_dict(state)
    model.requires_grad_(False)
    return model.eval(), tokenizer, hf_config, path


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        self.config = config or EngineConfig(**overrides)
        device, dtype = self.config.torch_device, self.config.torch_dtype
        self.model, self.tokenizer, self.hf_config, self.model_path = build_model(self.config.model, dtype, device)
        args = self.model.args
        self.max_model_len = min(self.config.max_model_len or args.max_position_embeddings,
                                 args.max_position_embeddings)
        self.runner = ModelRunner(self.model, self.config, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.lora_manager = LoRAManager(self.model, self.config.max_loras, self.config.max_lora_rank)
        self.scheduler = Scheduler(self.block_manager, self.lora_manager,
                                   self.config.max_tokens_per_batch, self.config.max_num_seqs)
        self.eos_token_ids = _eos_ids(self.tokenizer, self.hf_config)
        self.requests: dict[str, Sequence] = {}
        self.sampling_generator = torch.Generator(device)  # the draws of requests without a seed
        self.sampling_generator.seed()

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    # -- adapters ---------------------------------------------------------------------------
    def add_lora(self, name: str, source: str | Path) -> None:
        """Serve the PEFT adapter at ``source`` (a folder, ``file://``, ``pvc://`` or ``hf://`` URI) as ``name``."""
        self.lora_manager.register(name, resolve_source(str(source)))

    def remove_lora(self, name: str) -> None:
        self.lora_manager.unregister(name)

    def list_loras(self) -> list[str]:
        return sorted(self.lora_manager.registry)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora: str | None = None, arrival_time: float | None = None) -> None:
        """Queue a request; raises ``ValueError`` (bad prompt/params) or ``UnknownAdapterError``.

        ``arrival_time`` (``time.monotonic()`` clock) backdates a request that waited elsewhere."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.model.args.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.model.args.vocab_size})")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model context of {self.max_model_len} tokens")
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if total > capacity:
            raise ValueError(f"request needs {total} tokens of KV cache but the pool holds {capacity}")
        if lora is not None:
            self.lora_manager.check(lora)
        seq = Sequence(request_id, token_ids, params, lora_name=lora,
                       detokenizer=IncrementalDetokenizer(self.tokenizer, len(token_ids)))
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- co-serving: what the coming iteration asks for, and a step with fine-tuning riders -----
    def demand(self, now: float, slo: SLO) -> InferenceDemand:
        """The inference work the unfinished requests want from the coming iteration, and their SLO slack."""
        return inference_demand(self.requests.values(), now, slo)

    def step(self, token_budget: int | None = None, riders: RiderPlan | None = None) -> list[RequestOutput]:
        """Schedule up to ``token_budget`` tokens, run one forward with the fine-tuning work ``riders`` plans
        for that batch fused in, sample: outputs for every request that advanced. Should the fused forward
        fail, the batch runs again alone and ``RidersFailed`` carries its outputs."""
        batch = self.scheduler.schedule(token_budget)
        planned = list(riders(batch)) if riders is not None else []
        try:
            return self.execute(batch, planned)
        except Exception as error:
            if not planned:
                raise
            raise RidersFailed(error, self.execute(batch)) from error

    def execute(self, batch: ScheduledBatch, riders: Seq[Rider] = ()) -> list[RequestOutput]:
        """Run one scheduled batch (from ``scheduler.schedule``), fine-tuning ``riders`` fused into its
        forward, and sample (an empty batch: the riders run alone). Requests that could not be
        scheduled (``batch.failed``) come back as failed outputs, once the forward ran (should it raise,
        the batch can run again)."""
        if batch.seqs:
            outputs = self.process_outputs(batch, self.runner.execute(batch, riders))
        else:
            for rider in riders:
                run_rider(rider)
            outputs = []
        return [self._fail(seq, error) for seq, error in batch.failed] + outputs

    def process_outputs(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[RequestOutput]:
        """Advance ``num_computed_tokens``, sample the sequences due a token, check stop rules."""
        due = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens == seq.num_tokens:
                due.append(seq)
        sampled = sample(logits, due, self.sampling_generator)
        now = time.monotonic()
        outputs = []
        for seq, token in zip(due, sampled, strict=True):
            try:
                if isinstance(token, SamplingError):
                    raise token
                seq.token_ids.append(token.token_id)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                if seq.params.logprobs is not None:
                    seq.logprobs.append(token)
                self._check_stop(seq, token.token_id)
                outputs.append(self._output(seq))
            except Exception as error:  # sampling, detokenization, a stop check: this request fails alone
                outputs.append(self._fail(seq, error))
        return outputs

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """Finish ``seq`` with reason ``"error"``; its output carries the error and no new tokens."""
        log.warning("request %s failed: %s: %s", seq.request_id, type(error).__name__, error)
        if seq.block_table:  # its K/V may hold NaN/inf: attention weighs a reused block's stale slots by 0,
            # and 0 * NaN is NaN, so they would reach whoever gets the blocks next (its shared blocks stay)
            self.runner.kv_cache[:, :, self.block_manager.private_blocks(seq)] = 0  # [L, 2, blocks, bs, H_kv, D]
        self.scheduler.finish(seq, "error")
        self.requests.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id, text=seq.output_text, token_ids=list(seq.output_token_ids), delta_text="",
            delta_token_ids=[], finished=True, finish_reason="error", num_prompt_tokens=seq.num_prompt_tokens,
            arrival_time=seq.arrival_time, first_token_time=seq.first_token_time,
            error=f"{type(error).__name__}: {error}")

    def fail_all(self, error: Exception) -> None:
        """Finish every unfinished request with ``error`` (after an iteration failed as a whole)."""
        for seq in list(self.requests.values()):
            self._fail(seq, error)

    def _check_stop(self, seq: Sequence, token_id: int) -> None:
        """Decode the new token; finish ``seq`` on a stop token id, a stop string or its length limit."""
        p = seq.params
        detokenizer = seq.detokenizer
        stop_token = token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids)
        at_limit = seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len
        checked = len(detokenizer.text)
        # a stop token's own text is left out; a finishing request's last partial character is kept
        detokenizer.update(seq.token_ids, seq.num_tokens - stop_token, flush=stop_token or at_limit)
        hit = find_stop(detokenizer.text, checked, p.stop)
        if hit is not None:
            detokenizer.text = detokenizer.text[:hit]
        reason = "stop" if hit is not None or stop_token else "length" if at_limit else None
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)

    def _output(self, seq: Sequence) -> RequestOutput:
        # Hold back text that may still grow into a stop string.
        text = seq.output_text
        hold = 0 if seq.finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        visible = max(seq.sent_text_len, len(text) - hold)
        delta_text = text[seq.sent_text_len:visible]
        seq.sent_text_len = visible
        ids = seq.output_token_ids
        delta_ids = ids[seq.sent_token_len:]
        seq.sent_token_len = len(ids)
        return RequestOutput(
            request_id=seq.request_id, text=seq.output_text, token_ids=list(ids), delta_text=delta_text,
            delta_token_ids=delta_ids, finished=seq.finished, finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, logprobs=list(seq.logprobs),
            arrival_time=seq.arrival_time, first_token_time=seq.first_token_time,
        )

    # -- offline ----------------------------------------------------------------------------
    def generate(self, prompts: Seq[str | list[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 lora: str | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts to completion (as vLLM's ``LLM.generate``); outputs in prompt order."""
        params_list = list(params) if isinstance(params, list | tuple) else [params or SamplingParams()] * len(prompts)
        ids = [f"gen-{uuid.uuid4().hex}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(rid, prompt, p, lora)
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            while len(final) < len(ids):
                for out in self.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[rid] for rid in ids]


def _eos_ids(tokenizer, hf_config) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(hf_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    return ids
