"""``FinetuneRunner``: one FinetuneJob on the shared engine model, driven by token budgets.

Each ``run_work(budget)`` call (or ``plan_work`` + ``finish_work`` around a fused inference forward)
does one unit of the current micro-batch (its sequences packed into one stream, see ``work``):
forward or backward; when the step's last micro-batch finishes
backward the optimizer steps, and every
``publish.everySteps`` steps (and at the end) a new adapter version is written with the
checkpoint (optimizer, schedule, step, data position) needed to resume exactly there.
Nothing here draws from torch's global RNG, which unseeded sampling of other users' requests uses:
the LoRA init has its own generator seeded by ``training.seed``, dropout masks are a hash of
(seed, step, sequence) keys, and the data is read in file order, so a checkpoint needs no RNG state.
The loss of a step is the mean cross-entropy over all loss tokens of its
``gradientAccumulation`` micro-batches (each up to ``batchTokens`` tokens).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from flexllm.worker.adapters.store import AdapterStore
from flexllm.worker.engine.fused import run_rider
from flexllm.worker.engine.model import CausalLM
from flexllm.worker.finetune.data import (
    DataPosition,
    SequenceStream,
    TrainingSequence,
    micro_batches_per_epoch,
)
from flexllm.worker.finetune.lora_params import LoRAWeights
from flexllm.worker.finetune.optimizer import build_optimizer, optimizer_step
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.finetune.work import BatchWork, Unit, whole_budget
from flexllm.worker.protocol import JobProgress

TRAINER_STATE = "trainer_state.pt"
METADATA = "metadata.json"  # step, loss, tokens, time of a version


@dataclass(frozen=True)
class WorkDone:
    tokens: int  # token cost of the work done (0: the job is finished)
    kind: Literal["forward", "backward", "idle"]
    step_finished: bool = False
    loss: float | None = None  # the finished step's loss
    version: int | None = None  # the adapter version published after this work
    trained_tokens: float = 0.0  # training progress in tokens (``Unit.trained``): fine-tuning throughput


class FinetuneRunner:
    """Trains ``job`` on ``model`` (frozen, shared with inference); versions under ``adapter_root``."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        job: FinetuneJobSpec,
        adapter_root: Path,
        adapter: str,
        *,
        base_model: str = "",
        data_roots: Sequence[Path] | None = None,  # a worker's: the dataset must lie under one
        backward_window: int | None = None,
        resume: bool = True,
        publish: Callable[[Callable[[Path], None], int, float], int] | None = None,
    ):
        self.model, self.job, self.base_model = model, job, base_model
        self._publish = publish  # (write, step, loss) -> version: the serving side's store and registry
        self.backward_window = backward_window
        self.store, self.adapter = AdapterStore(adapter_root), adapter
        self.store.folder(adapter, 0)  # validates the name: no path traversal, no @version
        training = job.training
        path = job.dataset.resolve(data_roots)
        self.stream = SequenceStream(path, job.dataset.format, tokenizer, training.max_seq_len)
        if training.max_steps is not None:
            self.total_steps = training.max_steps
        else:
            counter = SequenceStream(path, job.dataset.format, tokenizer, training.max_seq_len)
            per_epoch = (
                micro_batches_per_epoch(counter, training.batch_tokens) / training.gradient_accumulation
            )
            self.total_steps = max(1, math.ceil(training.epochs * per_epoch))
        self.lora = LoRAWeights(model, job.lora, training.seed)
        self.params = list(self.lora.parameters())
        self.optimizer, self.schedule = build_optimizer(self.params, training, self.total_steps)
        self.step = 0
        self.tokens = 0  # training tokens of finished steps
        self.loss: float | None = None
        self.latest_version: int | None = None
        self.busy_seconds = 0.0
        self._queue: list[list[TrainingSequence]] = []  # the current step's micro-batches not started
        self._work: BatchWork | None = None
        self._step_targets = 0
        self._step_index = 0  # sequences of the current step started so far (dropout keys)
        self._step_loss = 0.0
        self._step_tokens = 0
        self._began = 0.0  # when the unit in progress was planned
        self.hold_at_step_boundary = False  # stopping: plan nothing of a next step (``at_step_boundary``)
        if resume and self.latest_folder() is not None:
            self.resume()

    # -- work ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def at_step_boundary(self) -> bool:
        """Between optimizer steps (no micro-batch of the next one started): ``state_dict`` can be taken."""
        return self._work is None and not self._queue

    @property
    def next_work_is_backward(self) -> bool:
        """Whether the next ``run_work`` may do backward work (priced higher by the scheduler); a micro-batch
        not started yet may open with a fused forward+backward unit, so it counts as backward."""
        return self._work is None or self._work.next_is_backward

    def run_work(self, token_budget: int) -> WorkDone:
        """Do one forward or backward unit costing up to ``token_budget`` tokens, on its own."""
        unit = self.plan_work(token_budget)
        if unit is None:
            return WorkDone(0, "idle")
        run_rider(unit)
        return self.finish_work(unit)

    def plan_work(self, token_budget: int) -> Unit | None:
        """The next unit (None: the job is done, or held at a step boundary). Run its layers, alone or
        riding an inference forward (``LLMEngine.execute(batch, riders)``), then ``finish_work`` it before
        planning another."""
        if token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        if self.done or (self.hold_at_step_boundary and self.at_step_boundary):
            return None
        self._began = time.perf_counter()
        return (self._work or self._next_batch()).plan(token_budget)

    def finish_work(self, unit: Unit) -> WorkDone:
        """Backpropagate and account a planned unit whose layers ran (the optimizer steps and versions
        publish as micro-batches and steps complete)."""
        work = self._work
        work.finish(unit)
        result = WorkDone(unit.cost, unit.kind, trained_tokens=unit.trained)
        if work.finished:
            result = self._batch_finished(work, result)
        self.busy_seconds += time.perf_counter() - self._began
        return result

    def _next_batch(self) -> BatchWork:
        training = self.job.training
        if not self._queue:  # a new optimizer step
            accumulation = training.gradient_accumulation
            self._queue = [self.stream.micro_batch(training.batch_tokens) for _ in range(accumulation)]
            self._step_targets = sum(s.num_targets for batch in self._queue for s in batch)
            self._step_index = 0
        seqs = self._queue.pop(0)
        first_key = (training.seed * 1_000_003 + self.step) * 8191 + self._step_index
        self._step_index += len(seqs)
        self._step_tokens += sum(len(s) for s in seqs)
        self._work = BatchWork(
            self.model,
            self.lora,
            seqs,
            1.0 / self._step_targets,
            self.job.lora.dropout,
            list(range(first_key, first_key + len(seqs))),
            self.backward_window,
        )
        return self._work

    def _batch_finished(self, work: BatchWork, result: WorkDone) -> WorkDone:
        self._work = None
        self._step_loss += work.loss_sum
        if self._queue:
            return result
        optimizer_step(self.optimizer, self.schedule, self.params, self.job.training.max_grad_norm)
        self.step += 1
        self.loss = self._step_loss / self._step_targets
        self.tokens += self._step_tokens
        self._step_loss, self._step_tokens = 0.0, 0
        version = None
        if self.step % self.job.publish.every_steps == 0 or self.done:
            version = self.publish()
        return replace(result, step_finished=True, loss=self.loss, version=version)

    # -- progress, versions, checkpoints -----------------------------------------------------
    @property
    def progress(self) -> JobProgress:
        """The job's progress hash as far as the runner knows it (the job handler adds phase and message)."""
        rate = self.tokens / self.busy_seconds if self.busy_seconds else 0.0
        remaining = (self.total_steps - self.step) * (self.tokens / self.step) if self.step else None
        return JobProgress(step=self.step, total_steps=self.total_steps, loss=self.loss, tokens_per_second=rate,
                           eta_seconds=int(remaining / rate) if remaining is not None and rate else None)

    def state_dict(self) -> dict:
        """Everything beyond the adapter weights needed to resume at this step boundary."""
        if not self.at_step_boundary:
            raise RuntimeError("a checkpoint is only taken between optimizer steps")
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": self.loss,
            "busy_seconds": self.busy_seconds,
            "data_position": asdict(self.stream.position),
            "data_stats": asdict(self.stream.stats),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.loss = state["step"], state["tokens"], state["loss"]
        self.busy_seconds = state["busy_seconds"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        stream = self.stream
        self.stream = SequenceStream(
            stream.path,
            stream.fmt,
            stream.tokenizer,
            stream.max_seq_len,
            DataPosition(**state["data_position"]),
        )
        self.stream.stats.__dict__.update(state["data_stats"])

    def publish(self) -> int:
        """Write the adapter + checkpoint as a new version; returns its number."""

        metadata = {"step": self.step, "loss": self.loss, "tokens": self.tokens, "time": time.time()}

        def write(folder: Path) -> None:
            self.lora.save_pretrained(folder, self.base_model)
            torch.save(self.state_dict(), folder / TRAINER_STATE)
            (folder / METADATA).write_text(json.dumps(metadata, indent=2))

        if self._publish is not None:
            self.latest_version = self._publish(write, self.step, self.loss)
        else:
            self.latest_version = self.store.publish(self.adapter, write, self.step, self.loss).version
            self.store.gc(self.adapter, self.job.publish.keep_versions)
        return self.latest_version

    def latest_folder(self) -> Path | None:
        versions = self.store.versions(self.adapter)
        return self.store.folder(self.adapter, versions[-1]) if versions else None

    def resume(self) -> int:
        """Continue from the latest version (weights and checkpoint); returns its step."""
        from safetensors.torch import load_file

        folder = self.latest_folder()
        if folder is None:
            raise FileNotFoundError(f"no version of adapter {self.adapter!r} to resume from")
        self.lora.load_peft_state_dict(load_file(folder / "adapter_model.safetensors"))
        self.load_state_dict(torch.load(folder / TRAINER_STATE, weights_only=True))
        self.latest_version = int(folder.name[1:])
        return self.step


def train(
    model: CausalLM,
    tokenizer,
    job: FinetuneJobSpec,
    adapter_root: Path,
    adapter: str,
    *,
    token_budget: int = 512,
    until_step: int | None = None,
    **runner_options,
) -> FinetuneRunner:
    """Fine-tune alone: ``run_work(token_budget)`` until the job (or ``until_step``) is done.

    With no inference to share the iterations with, units and groups are as large as the budget
    (``backward_window`` defaults to ``token_budget``).
    """
    runner_options.setdefault("backward_window", token_budget)
    runner = FinetuneRunner(model, tokenizer, job, adapter_root, adapter, **runner_options)
    stop = runner.total_steps if until_step is None else min(until_step, runner.total_steps)
    budget = whole_budget(model.args, token_budget)
    while runner.step < stop:
        runner.run_work(budget)
    return runner
