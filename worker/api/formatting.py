"""Response bodies and stream chunks in the OpenAI shapes, and logprobs rendering."""

from __future__ import annotations

import json
from typing import Any

from flexllm.worker.queue.messages import OutputChunk, TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Renderer:
    """Builds one request's bodies; ``chat`` picks chat.completion(.chunk) over text_completion."""

    def __init__(self, request_id: str, model: str, created: int, chat: bool, tokenizer):
        self.request_id, self.model, self.created, self.chat = request_id, model, created, chat
        self.tokenizer = tokenizer
        self.text_offset = 0

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.request_id, "object": f"{kind}.chunk" if chunk and self.chat else kind,
                "created": self.created, "model": self.model}

    def logprobs(self, tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if tokens is None:
            return None
        decode = self._token_text
        if self.chat:
            return {"content": [{"token": decode(t.token_id), "logprob": t.logprob,
                                 "bytes": list(decode(t.token_id).encode()),
                                 "top_logprobs": [{"token": decode(i), "logprob": lp, "bytes": list(decode(i).encode())}
                                                  for i, lp in (t.top or {}).items()]}
                                for t in tokens]}
        offsets = []
        for t in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(decode(t.token_id))
        return {"tokens": [decode(t.token_id) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{decode(i): lp for i, lp in (t.top or {}).items()} for t in tokens],
                "text_offset": offsets}

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _choice(self, text: str, finish_reason: str | None, logprobs: dict | None, delta: bool,
                first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text} if not delta or first else {"content": text}
        return {"index": 0, ("delta" if delta else "message"): message, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def chunk(self, chunk: OutputChunk, first: bool) -> dict[str, Any]:
        """A stream chunk carrying one output chunk's new text."""
        choice = self._choice(chunk.text, chunk.finish_reason, self.logprobs(chunk.logprobs), True, first)
        return self._envelope(True) | {"choices": [choice]}

    def usage_chunk(self, last: OutputChunk) -> dict[str, Any]:
        return self._envelope(True) | {"choices": [], "usage": usage(last.prompt_tokens, last.completion_tokens)}

    def response(self, chunks: list[OutputChunk]) -> dict[str, Any]:
        """The non-streaming body from all of a request's chunks."""
        last = chunks[-1]
        tokens = [t for c in chunks for t in (c.logprobs or [])] if last.logprobs is not None else None
        choice = self._choice("".join(c.text for c in chunks), last.finish_reason, self.logprobs(tokens), False)
        return self._envelope(False) | {"choices": [choice],
                                        "usage": usage(last.prompt_tokens, last.completion_tokens)}
