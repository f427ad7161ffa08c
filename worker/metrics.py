"""Prometheus metrics: latency histograms, SLO attainment, tokens by kind, queue depths, fine-tuning."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flexllm.worker import protocol
from flexllm.worker.options import SLO
from flexllm.worker.queue.connection import TRANSIENT_ERRORS
from flexllm.worker.queue.jobs import JobQueue, list_jobs

if TYPE_CHECKING:
    from flexllm.worker.engine.block_manager import BlockManager

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
ATTAINMENT_WINDOW = 1000  # requests


class Metrics:
    """All metrics of one process, in their own registry (so several apps can live in one process)."""

    def __init__(self, slo: SLO | None = None, registry: CollectorRegistry | None = None):
        self.slo = slo or SLO()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("flexllm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.ttft = Histogram("flexllm_time_to_first_token_seconds", "Time to first token (API-observed)",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("flexllm_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("flexllm_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=TTFT_BUCKETS, registry=r)
        self.slo_requests = Counter("flexllm_slo_requests", "Finished requests by SLO outcome (TTFT and TPOT)",
                                    ["result"], registry=r)
        self.slo_attainment = Gauge("flexllm_slo_attainment",
                                    f"Share of the last {ATTAINMENT_WINDOW} requests meeting both SLOs", registry=r)
        self.tokens = Counter("flexllm_tokens", "Tokens processed, by kind (prompt, generation, finetune)",
                              ["kind"], registry=r)
        self.engine_steps = Counter("flexllm_engine_steps", "Engine iterations that ran a batch", registry=r)
        self.running = Gauge("flexllm_running_requests", "Requests in this engine", registry=r)
        self.prefix_cache = PrefixCacheCollector()
        r.register(self.prefix_cache)
        self._window: deque[bool] = deque(maxlen=ATTAINMENT_WINDOW)

    def observe_request(self, ttft_s: float, tpot_s: float | None, e2e_s: float) -> None:
        self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        self.e2e.observe(e2e_s)
        met = self.slo.met(ttft_s, tpot_s)
        self.slo_requests.labels("met" if met else "missed").inc()
        self._window.append(met)
        self.slo_attainment.set(sum(self._window) / len(self._window))


class PrefixCacheCollector(Collector):
    """The engine's KV prefix-cache counters (``BlockManager``), read at scrape time once an engine is set."""

    def __init__(self) -> None:
        self.block_manager: BlockManager | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        if self.block_manager is None:
            return
        queries = CounterMetricFamily("flexllm_prefix_cache_queries", "Prompt tokens looked up in the KV prefix cache")
        queries.add_metric([], self.block_manager.query_tokens)
        hits = CounterMetricFamily("flexllm_prefix_cache_hits", "Prompt tokens found in the KV prefix cache")
        hits.add_metric([], self.block_manager.hit_tokens)
        yield from (queries, hits)


class RedisStateCollector(Collector):
    """Read at scrape time from Redis: queue depths and the progress of the service's fine-tuning jobs."""

    def __init__(self, client: redis.Redis, service: str):
        self.client, self.service = client, service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("flexllm_queue_depth", "Entries waiting or in progress", labels=["queue"])
        step = GaugeMetricFamily("flexllm_finetune_step", "Fine-tuning step", labels=["job"])
        total = GaugeMetricFamily("flexllm_finetune_total_steps", "Fine-tuning steps planned", labels=["job"])
        loss = GaugeMetricFamily("flexllm_finetune_loss", "Latest fine-tuning loss", labels=["job"])
        speed = GaugeMetricFamily("flexllm_finetune_tokens_per_second", "Fine-tuning tokens/s", labels=["job"])
        try:
            jobs = JobQueue(self.client, self.service)
            depth.add_metric(["requests"], self.client.xlen(protocol.request_stream(self.service)))
            depth.add_metric(["jobs"], jobs.depth())
            for _, job in list_jobs(self.client, self.service):
                progress = jobs.progress(job)
                for family, value in ((step, progress.step), (total, progress.total_steps), (loss, progress.loss),
                                      (speed, progress.tokens_per_second)):
                    if value is not None:
                        family.add_metric([job], float(value))
        except TRANSIENT_ERRORS as error:
            log.warning("metrics: Redis unreachable: %s", error)
        yield from (depth, step, total, loss, speed)
