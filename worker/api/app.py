"""The FastAPI app: OpenAI-compatible routes over the Redis request queue."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flexllm.worker import protocol
from flexllm.worker.adapters.registry import UnknownModelError, latest_versions, parse_versions, resolve_model
from flexllm.worker.api.errors import APIError, install_error_handlers
from flexllm.worker.api.formatting import Renderer, sse
from flexllm.worker.api.generation import Generation
from flexllm.worker.api.limits import BodySizeLimit, require_api_key
from flexllm.worker.api.middleware import RequestContext
from flexllm.worker.api.prompts import chat_prompt_ids, check_prompt, completion_prompt_ids, sampling_params
from flexllm.worker.api.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from flexllm.worker.metrics import Metrics, RedisStateCollector
from flexllm.worker.names import InvalidNameError
from flexllm.worker.queue.connection import TRANSIENT_ERRORS, connect, connect_async
from flexllm.worker.queue.messages import InferenceRequest
from flexllm.worker.queue.requests import OutputReader, RequestProducer

log = logging.getLogger(__name__)
LOADING_RETRY_AFTER_S = 5


@dataclass
class ApiConfig:
    redis_url: str
    service: str = "default"
    model_name: str = "smollm2-135m"  # the base model's name in requests and /v1/models
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 32768
    max_queued_requests: int = 1024
    request_timeout_s: float = 600.0
    api_key: str | None = None
    redis_connections: int = 64  # the pool for short commands; waiting for output uses one more connection
    redis_wait_s: float = 10.0  # a command waits this long for a free pooled connection, then 503


class ApiState:
    """What the routes share; the model part (tokenizer, context length) arrives once the engine is up."""

    def __init__(self, config: ApiConfig, metrics: Metrics):
        self.config, self.metrics = config, metrics
        self.redis = connect_async(config.redis_url, config.redis_connections, config.redis_wait_s)
        reader = OutputReader(connect_async(config.redis_url, 1, config.redis_wait_s), self.redis, config.service)
        self.producer = RequestProducer(self.redis, reader, config.service)
        self.tokenizer = None
        self.max_model_len = self.vocab_size = 0
        self.created = int(time.time())
        self.engine_error: str | None = None  # set when the engine loop died: /healthz then fails
        self.draining = False  # set on SIGTERM/SIGINT: no new requests, /readyz fails

    def engine_failed(self, error: BaseException) -> None:
        self.engine_error = f"{type(error).__name__}: {error}"

    def attach_model(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer, self.max_model_len, self.vocab_size = tokenizer, max_model_len, len(tokenizer)

    @property
    def model_ready(self) -> bool:
        return self.tokenizer is not None

    def require_ready(self) -> None:
        """503 with ``Retry-After`` unless a request can be served now (model loaded, not shutting down)."""
        if self.engine_error is not None:
            raise APIError(503, f"the engine stopped: {self.engine_error}", code="engine_stopped")
        if self.draining:
            raise APIError(503, "this replica is shutting down; retry on another", code="shutting_down",
                           retry_after_s=1)
        if not self.model_ready:
            raise APIError(503, "the model is still loading; retry shortly", code="loading",
                           retry_after_s=LOADING_RETRY_AFTER_S)

    async def adapter_versions(self):
        try:
            return parse_versions(await self.redis.hgetall(protocol.adapter_versions(self.config.service)))
        except TRANSIENT_ERRORS as error:
            raise APIError(503, f"the adapter registry (Redis) is unreachable: {error}") from error

    async def resolve(self, model: str) -> str | None:
        try:
            return resolve_model(model, self.config.model_name, await self.adapter_versions())
        except UnknownModelError as error:
            raise APIError(404, str(error), param="model", code="model_not_found") from error
        except InvalidNameError as error:
            raise APIError(400, str(error), param="model", code="invalid_model") from error


def create_app(config: ApiConfig, metrics: Metrics | None = None) -> FastAPI:
    """The app; call ``app.state.api.attach_model(tokenizer, max_model_len)`` once the engine is loaded."""
    metrics = metrics or Metrics()
    state = ApiState(config, metrics)
    metrics.registry.register(RedisStateCollector(connect(config.redis_url), config.service))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await state.producer.reader.aclose()
        await state.redis.aclose()

    app = FastAPI(title="FlexLLM", version="0.1.0", lifespan=lifespan)
    app.state.api = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestContext, metrics=metrics, routes=app.routes)  # outermost: ids, 500s, metrics
    authorized = [Depends(require_api_key(config.api_key))]

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if state.engine_error is not None:  # the liveness probe restarts the pod; its requests are reclaimed
            return JSONResponse({"status": "engine stopped", "error": state.engine_error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            redis_ok = bool(await state.redis.ping())
        except TRANSIENT_ERRORS:
            redis_ok = False
        ready = redis_ok and state.model_ready and state.engine_error is None and not state.draining
        return JSONResponse({"ready": ready, "model": state.model_ready, "redis": redis_ok,
                             "draining": state.draining}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        state.require_ready()
        versions = await state.adapter_versions()
        base = config.model_name

        def card(name: str, parent: str | None, root: str) -> dict:
            return {"id": name, "object": "model", "created": state.created, "owned_by": "flexllm",
                    "root": root, "parent": parent}

        data = [card(base, None, base)]
        data += [card(v.adapter, base, v.name) for v in sorted(latest_versions(versions).values(),
                                                               key=lambda v: v.adapter)]
        data += [card(name, base, name) for name in sorted(versions)]
        return {"object": "list", "data": data}

    async def serve(request: GenerationRequest, prompt_ids: list[int], max_tokens: int | None,
                    logprobs: int | None, chat: bool):
        check_prompt(prompt_ids, config.max_prompt_tokens, state.max_model_len, state.vocab_size)
        params = sampling_params(request, max_tokens, logprobs, len(prompt_ids), state.max_model_len)
        lora = await state.resolve(request.model)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        job = InferenceRequest(request_id, prompt_ids, asdict(params), lora)
        generation = Generation(state.producer, job, metrics, config.max_queued_requests,
                                config.request_timeout_s)
        await generation.start()
        renderer = Renderer(request_id, request.model, int(time.time()), chat, state.tokenizer)
        if request.stream:
            return StreamingResponse(_stream(generation, renderer, request.include_usage),
                                     media_type="text/event-stream")
        try:
            chunks = [chunk async for chunk in generation.chunks()]
        finally:
            await generation.aclose()
        return renderer.response(chunks)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: CompletionRequest):
        state.require_ready()
        if request.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt_ids = completion_prompt_ids(state.tokenizer, request)
        return await serve(request, prompt_ids, request.max_tokens, request.logprobs, chat=False)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: ChatCompletionRequest):
        state.require_ready()
        prompt_ids = chat_prompt_ids(state.tokenizer, request)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens or request.max_tokens
        return await serve(request, prompt_ids, max_tokens, logprobs, chat=True)

    return app


async def _stream(generation: Generation, renderer: Renderer, include_usage: bool) -> AsyncIterator[str]:
    """SSE: one event per output chunk, the usage chunk if asked for, then ``[DONE]``."""
    last = None
    try:
        async for chunk in generation.chunks():
            if chunk.error is not None:
                yield sse({"error": chunk.error})
                break
            yield sse(renderer.chunk(chunk, first=last is None))
            last = chunk
        if include_usage and last is not None:
            yield sse(renderer.usage_chunk(last))
        yield sse("[DONE]")
    except Exception as error:  # the status line is sent: the stream ends with an error event instead
        log.exception("stream of %s broken", renderer.request_id)
        yield sse({"error": {"message": f"the stream broke: {type(error).__name__}: {error}",
                             "type": "InternalServerError", "code": 500}})
    finally:
        await generation.aclose()
