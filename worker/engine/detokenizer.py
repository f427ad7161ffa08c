"""Incremental detokenization and stop strings: each new token decodes a few tokens, not the whole output.

As vLLM and HF's ``TextStreamer``: ``token_ids[prefix_offset:read_offset]`` is text already emitted,
kept as context so that decoding ``token_ids[prefix_offset:]`` gets word-boundary spaces right
(SentencePiece strips a leading space; byte-level BPE pieces join across tokens). Text is added once
it does not end in U+FFFD, i.e. once a multi-byte character split over tokens is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    """One request's output text; ``start`` is where its output begins in the token ids."""

    tokenizer: Any  # a Hugging Face tokenizer
    start: int
    text: str = ""
    prefix_offset: int = -1
    read_offset: int = -1
    prefix_text: str = ""  # the decoded token_ids[prefix_offset:read_offset]

    def __post_init__(self) -> None:
        self.prefix_offset = self.read_offset = self.start

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def update(self, token_ids: list[int], end: int, flush: bool = False) -> None:
        """Add the text of ``token_ids[:end]`` past what is done to ``self.text``, unless it ends in a
        character still incomplete.
        ``flush`` (the request finishes) adds even an incomplete character, as a full decode would."""
        window_text = self.decode(token_ids[self.prefix_offset:end])
        if not flush and (len(window_text) <= len(self.prefix_text) or window_text.endswith(REPLACEMENT_CHAR)):
            return
        new_text = window_text[len(self.prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, end
        self.prefix_text = self.decode(token_ids[self.prefix_offset:end])
        self.text += new_text


def find_stop(text: str, new_from: int, stops: list[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text``, looking only at matches that end after
    ``new_from`` (the text before it was checked already); None if there is none."""
    if not stops:
        return None
    start = max(0, new_from - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
