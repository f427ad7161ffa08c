"""Fuzzing the HTTP API from its own OpenAPI schema (``benchmarks/fuzz_api.py``, bounded here): no input
gets a 5xx or stops the engine, and a greedy completion is the same after the run as before it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_api.py"
EXAMPLES = 100  # per operation and mode (schema-valid, schema-violating): about 400 requests
SERVED = 40  # of them at least this many answered 200: the run reached the engine, not only the validators


@pytest.fixture(scope="module")
def fuzz_api():
    spec = importlib.util.spec_from_file_location("fuzz_api", BENCH)
    module = sys.modules["fuzz_api"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_generated_input_gets_a_5xx_or_stops_the_engine(server, fuzz_api):
    before = fuzz_api.greedy_text(server.base_url)
    result = fuzz_api.fuzz(server.base_url, EXAMPLES, seed=0)
    assert result.failures == [], "\n".join(result.failures)
    assert result.inputs >= 4 * EXAMPLES and result.by_status.get(200, 0) >= SERVED
    assert any(400 <= status < 500 for status in result.by_status)
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200
    assert fuzz_api.greedy_text(server.base_url) == before
