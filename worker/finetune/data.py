"""JSONL training data: streamed line by line, validated, tokenized, packed into steps.

Formats: ``text`` ({"text"}: loss on every token), ``prompt-completion`` ({"prompt", "completion"}:
loss on the completion and EOS only) and ``chat`` ({"messages": [{role, content}, ...]} rendered
with the tokenizer's chat template: loss on the assistant turns only). A sequence longer than
``maxSeqLen`` is truncated to its first ``maxSeqLen`` tokens; one left with no loss token is a bad
line. Bad lines are counted (``DataStats``) and skipped; an epoch with no valid line is an error.
Lines are read in file order (no shuffling, so a job can resume from a line number).

A worker reads datasets only under its data roots (``dataset_path``): nothing else it can read is
offered to a FinetuneJob, and a refusal does not tell whether a file exists.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """The dataset cannot train anything (missing, or no valid line)."""


def dataset_path(source: str, roots: Sequence[Path] | None) -> Path:
    """The file of a dataset ``source`` (``file://`` URI or path; a relative one is relative to the
    working directory). With ``roots`` (a worker's data roots) it must lie under one of them once every
    symlink is followed, with no ``..``, and the refusal reads the same whether or not the file exists.
    ``roots=None`` is for a trusted caller (offline training): any path."""
    path = Path(source.removeprefix("file://"))
    if roots is None:
        return path
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        resolved = None
    if ".." not in path.parts and resolved is not None and any(resolved.is_relative_to(r.resolve()) for r in roots):
        return resolved
    allowed = ", ".join(str(r) for r in roots) or "none configured (--data-dir)"
    raise DatasetError(f"dataset {source!r} is refused: datasets must be files under the data roots ({allowed}), "
                       "without '..' or symlinks leading out")


@dataclass(frozen=True)
class TrainingSequence:
    """``token_ids`` [n]; ``is_target[i]``: token i is a loss target (predicted from position i - 1)."""

    token_ids: tuple[int, ...]
    is_target: tuple[bool, ...]
    line: int  # 1-based line number in the dataset

    @property
    def num_targets(self) -> int:
        return sum(self.is_target[1:])

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class DataStats:
    valid: int = 0
    bad: int = 0
    truncated: int = 0
    first_error: str | None = None

    def record_bad(self, line: int, error: str) -> None:
        self.bad += 1
        if self.first_error is None:
            self.first_error = f"line {line}: {error}"


@dataclass
class DataPosition:
    """Where the stream resumes: the next line to read in ``epoch``."""

    epoch: int = 0
    line: int = 0  # lines of the file already consumed in this epoch


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"field {key!r} must be a non-empty string")
    return value


def _encode_text(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    ids = tokenizer.encode(_text(record, "text")) + [tokenizer.eos_token_id]
    return ids, [True] * len(ids)


def _encode_prompt_completion(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    prompt = tokenizer.encode(_text(record, "prompt"))
    completion = tokenizer.encode(_text(record, "completion"), add_special_tokens=False) + [
        tokenizer.eos_token_id
    ]
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def _encode_chat(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError("each message needs string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    ids: list[int] = []
    is_target: list[bool] = []
    for i, message in enumerate(messages):  # each turn's new tokens; assistant turns are targets
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False)
        if message["role"] == "assistant":
            prefix = tokenizer.apply_chat_template(
                messages[:i], tokenize=True, add_generation_prompt=True, return_dict=False
            )
            if full[: len(prefix)] != prefix:
                raise ValueError("the chat template does not render turns as prefixes")
            is_target += [False] * (len(prefix) - len(ids)) + [True] * (len(full) - len(prefix))
        else:
            is_target += [False] * (len(full) - len(ids))
        ids = full
    return ids, is_target


ENCODERS = {"text": _encode_text, "prompt-completion": _encode_prompt_completion, "chat": _encode_chat}


def encode_line(raw: str, fmt: str, tokenizer, max_seq_len: int, line: int) -> tuple[TrainingSequence, bool]:
    """One JSONL line -> (sequence, truncated); raises ``ValueError`` naming what is wrong."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError("a line must hold a JSON object")
    ids, is_target = ENCODERS[fmt](record, tokenizer)
    truncated = len(ids) > max_seq_len
    seq = TrainingSequence(tuple(ids[:max_seq_len]), tuple(is_target[:max_seq_len]), line)
    if seq.num_targets == 0:
        raise ValueError(f"no loss tokens within maxSeqLen={max_seq_len}")
    return seq, truncated


class SequenceStream:
    """Valid sequences of the dataset, epoch after epoch, from a resumable ``DataPosition``."""

    def __init__(
        self, path: Path, fmt: str, tokenizer, max_seq_len: int, position: DataPosition | None = None
    ):
        if not path.is_file():
            raise DatasetError(f"dataset {str(path)!r} does not exist")
        self.path, self.fmt, self.tokenizer, self.max_seq_len = path, fmt, tokenizer, max_seq_len
        self._start = DataPosition(position.epoch, position.line) if position else DataPosition()
        self.stats = DataStats()
        self._iter = self._sequences()
        self._pending: tuple[int, TrainingSequence] | None = None  # (epoch, sequence) read, not consumed

    @property
    def position(self) -> DataPosition:
        """Where a new stream must start to yield what this one yields next."""
        if self._pending is not None:
            epoch, seq = self._pending
            return DataPosition(epoch, seq.line - 1)
        return DataPosition(self._start.epoch, self._start.line)

    def read_epoch(self, skip: int = 0) -> Iterator[TrainingSequence]:
        """The valid sequences from line ``skip`` to the end of the file (counting bad lines)."""
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for index, raw in enumerate(f):
                if index < skip:
                    continue
                self._start.line = index + 1
                if not raw.strip():
                    continue
                try:
                    seq, truncated = encode_line(raw, self.fmt, self.tokenizer, self.max_seq_len, index + 1)
                except ValueError as e:
                    self.stats.record_bad(index + 1, str(e))
                    continue
                self.stats.valid += 1
                self.stats.truncated += truncated
                yield seq

    def _sequences(self) -> Iterator[tuple[int, TrainingSequence]]:
        while True:
            skip, found = self._start.line, False
            for seq in self.read_epoch(skip):
                found = True
                yield self._start.epoch, seq
            if not found and skip == 0:
                raise DatasetError(
                    f"dataset {str(self.path)!r} has no valid line; first error: "
                    f"{self.stats.first_error or 'the file is empty'}"
                )
            self._start = DataPosition(self._start.epoch + 1, 0)

    def micro_batch(self, batch_tokens: int) -> list[TrainingSequence]:
        """Next sequences up to ``batch_tokens`` tokens in total (at least one sequence)."""
        batch: list[TrainingSequence] = []
        used = 0
        while True:
            epoch, seq = self._pending or next(self._iter)
            self._pending = None
            if batch and used + len(seq) > batch_tokens:
                self._pending = (epoch, seq)
                return batch
            batch.append(seq)
            used += len(seq)


def micro_batches_per_epoch(stream: SequenceStream, batch_tokens: int) -> int:
    """How many micro-batches one pass over the dataset packs into (at least 1). A job's runner is built
    beside the engine loop (``coserve.jobs``): each line yields the GIL, so that inference is not held up."""
    count, used = 0, batch_tokens
    for seq in stream.read_epoch():
        time.sleep(0)
        if used + len(seq) > batch_tokens:
            count, used = count + 1, 0
        used += len(seq)
    return max(1, count)
