"""Admission under load: a burst far over the queue limit gets 200s and 429s, never a 5xx, and the
queue limit holds across two API processes sharing one request stream."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from transformers import AutoTokenizer

from flexllm.worker.api.app import ApiConfig, create_app
from flexllm.worker.protocol import request_stream

from .conftest import ServerThread, start_server, wait_ready

QUEUE_LIMIT = 16
BURST = 300


async def _burst(base_urls: list[str], count: int) -> list[httpx.Response]:
    body = {"model": "tiny", "prompt": "Count with me: one two", "max_tokens": 4, "temperature": 0}
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        return await asyncio.gather(*(client.post(f"{base_urls[i % len(base_urls)]}/v1/completions", json=body)
                                      for i in range(count)))


def test_burst_over_the_queue_limit_gets_only_200_and_429(tiny_llama_dir, redis_url, redis_client, tmp_path):
    threads, app, service, _ = start_server(tiny_llama_dir, redis_url, tmp_path, max_queued_requests=QUEUE_LIMIT)
    second = create_app(ApiConfig(redis_url=redis_url, service=service, model_name="tiny",
                                  max_queued_requests=QUEUE_LIMIT))  # another API replica, no engine of its own
    second.state.api.attach_model(AutoTokenizer.from_pretrained(tiny_llama_dir), 256)
    depths, sampling = [], threading.Event()

    def sample_depth() -> None:
        while not sampling.is_set():
            depths.append(redis_client.xlen(request_stream(service)))
            time.sleep(0.002)

    with threads as base_url, ServerThread(second, None) as second_url:
        wait_ready(base_url)
        sampler = threading.Thread(target=sample_depth)
        sampler.start()
        try:
            replies = asyncio.run(_burst([base_url, second_url], BURST))
        finally:
            sampling.set()
            sampler.join(timeout=10)
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        assert statuses.count(200) >= QUEUE_LIMIT and statuses.count(429) > 0
        busy = next(r for r in replies if r.status_code == 429)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "RateLimitError" and busy.json()["error"]["code"] == "queue_full"
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in replies if r.status_code == 200)
        assert max(depths) <= QUEUE_LIMIT  # checked and enqueued in one step, by both API processes
        after = httpx.post(f"{second_url}/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "still", "max_tokens": 2})
        assert after.status_code == 200  # every admitted request left the queue
