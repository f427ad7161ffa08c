"""From an API request to what the engine takes: prompt token ids and ``SamplingParams``."""

from __future__ import annotations

from jinja2 import TemplateError

from flexllm.worker.api.errors import APIError
from flexllm.worker.api.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from flexllm.worker.engine.sampling import SamplingParams


def completion_prompt_ids(tokenizer, request: CompletionRequest) -> list[int]:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, "batched prompts are not supported: send one request per prompt", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return list(prompt)


def chat_prompt_ids(tokenizer, request: ChatCompletionRequest) -> list[int]:
    """Apply the model's chat template (with the assistant turn opened) and tokenize."""
    if tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    except ValueError as error:
        raise APIError(400, str(error), param="messages") from error
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as error:  # the template's own checks, e.g. roles that must alternate
        raise APIError(400, f"the model's chat template rejects these messages: {error}", param="messages") from error
    return tokenizer.encode(text, add_special_tokens=False)


def check_prompt(prompt_ids: list[int], max_prompt_tokens: int, max_model_len: int, vocab_size: int) -> None:
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if max(prompt_ids) >= vocab_size:
        raise APIError(400, f"prompt token ids must be below the vocabulary size {vocab_size}", param="prompt")
    if len(prompt_ids) > max_prompt_tokens:
        raise APIError(413, f"the prompt has {len(prompt_ids)} tokens; this server accepts at most "
                            f"{max_prompt_tokens}", param="prompt", code="prompt_too_long")
    if len(prompt_ids) >= max_model_len:
        raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) leaves no room to generate in the "
                            f"model context of {max_model_len} tokens", param="prompt")


def sampling_params(request: GenerationRequest, max_tokens: int | None, logprobs: int | None,
                    prompt_len: int, max_model_len: int) -> SamplingParams:
    """Validated ``SamplingParams``; ``max_tokens`` defaults to the rest of the context (as vLLM)."""
    room = max_model_len - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model "
                            f"context of {max_model_len} tokens", param="max_tokens")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    try:
        return SamplingParams(
            max_tokens=room if max_tokens is None else max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k in (None, 0) else request.top_k,
            min_p=request.min_p or 0.0, presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            seed=request.seed, stop=stop, stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos, logprobs=logprobs)
    except ValueError as error:
        raise APIError(400, str(error), param=str(error).split(" ", 1)[0]) from error
