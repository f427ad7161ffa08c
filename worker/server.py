"""One process, the API and the engine loop behind it: what ``flexllm serve`` and ``flexllm demo`` run."""

from __future__ import annotations

from fastapi import FastAPI

from flexllm.worker.api.app import ApiConfig, create_app
from flexllm.worker.engine.config import EngineConfig
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.metrics import Metrics
from flexllm.worker.options import WorkerOptions
from flexllm.worker.serving import EngineWorker


def api_and_worker(engine_config: EngineConfig, options: WorkerOptions, api_config: ApiConfig
                   ) -> tuple[FastAPI, EngineWorker]:
    """The OpenAI-compatible app and the engine worker that serves its requests, sharing one ``Metrics``:
    the app answers 503 until the worker has loaded the model, and reports the worker's failure."""
    metrics = Metrics(options.slo)
    app = create_app(api_config, metrics)
    api = app.state.api
    worker = EngineWorker(engine_config, options, metrics, FinetuneJobSpec.model_validate,
                          on_ready=lambda engine: api.attach_model(engine.tokenizer, engine.max_model_len),
                          on_failure=api.engine_failed)
    return app, worker
