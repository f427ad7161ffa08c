"""The OpenAI API end to end: real openai client, uvicorn on 127.0.0.1, embedded Valkey, engine thread."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from flexllm.worker.adapters.publisher import AdapterPublisher
from flexllm.worker.adapters.registry import AdapterRegistry
from flexllm.worker.adapters.store import AdapterStore
from flexllm.worker.api.app import ApiConfig, create_app
from flexllm.worker.protocol import output_stream, replica_state, request_stream

from .conftest import ServerThread, unique_service


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_completion_non_streaming_and_streaming_agree(client):
    full = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    stream = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=12,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_completion_streaming_with_usage_and_logprobs(client):
    messages = [{"role": "user", "content": "Say hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.role == "assistant"
    content = reply.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_stop_string_and_seeded_sampling(client):
    first = client.completions.create(model="tiny", prompt="a b c", max_tokens=20, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    again = client.completions.create(model="tiny", prompt="a b c", max_tokens=20, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert first.choices[0].text == again.choices[0].text
    stop = first.choices[0].text[3:6]
    cut = client.completions.create(model="tiny", prompt="a b c", max_tokens=20, temperature=1.0, seed=7,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_penalties_and_min_p_reach_the_sampler(client):
    def complete(**extra):
        return client.completions.create(model="tiny", prompt="a b c", max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True, **extra}).choices[0].text

    plain = complete()
    assert complete(presence_penalty=2.0, frequency_penalty=2.0) != plain
    assert complete(repetition_penalty=50.0) != plain
    assert complete(min_p=0.5) == plain  # greedy: min-p keeps the most likely token


def test_errors_have_openai_shape_and_server_keeps_serving(server, client):
    raw = httpx.post(f"{server.base_url}/v1/completions", content=b"{not json", timeout=10,
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "BadRequestError"
    with pytest.raises(openai.BadRequestError) as negative:
        client.completions.create(model="tiny", prompt="hi", max_tokens=-3)
    assert "max_tokens" in negative.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=10_000)  # beyond the context
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as huge:
        client.completions.create(model="tiny", prompt="x" * (10 << 20), max_tokens=2)
    assert huge.value.status_code == 413 and "exceeds" in huge.value.body["message"]
    ok = client.completions.create(model="tiny", prompt="still there?", max_tokens=3)
    assert ok.usage.completion_tokens >= 1


def test_models_and_metrics(server, client):
    assert [m.id for m in client.models.list().data][0] == "tiny"
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("flexllm_time_to_first_token_seconds_bucket", "flexllm_time_per_output_token_seconds_bucket",
                 'flexllm_tokens_total{kind="generation"}', 'flexllm_queue_depth{queue="requests"}',
                 "flexllm_slo_attainment", "flexllm_requests_total", "flexllm_prefix_cache_queries_total",
                 "flexllm_prefix_cache_hits_total"):
        assert name in text, name
    assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}


def _wait(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_adapter_versions_hot_load_and_are_addressable(server, client, redis_client, peft_adapter):
    store = AdapterStore(server.adapter_dir)
    publisher = AdapterPublisher(store, AdapterRegistry(redis_client, server.service))
    v1 = publisher.publish("sql", lambda d: shutil.copytree(peft_adapter, d, dirs_exist_ok=True), step=10, loss=1.5,
                           keep_versions=2)
    replica_key = replica_state(server.service, f"replica-{server.service}")
    _wait(lambda: "sql@v1" in json.loads(redis_client.hget(replica_key, "adapters") or "[]"))
    ids = [m.id for m in client.models.list().data]
    assert {"sql", "sql@v1"} <= set(ids)
    prompt = dict(prompt="Once upon a time", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    base = client.completions.create(model="tiny", **prompt).choices[0].text
    tuned = client.completions.create(model="sql", **prompt).choices[0].text
    assert tuned != base
    assert client.completions.create(model="sql@v1", **prompt).choices[0].text == tuned

    broken = store.describe("sql", 2)  # registered, but its folder was never written
    AdapterRegistry(redis_client, server.service).register(broken)
    failed = _wait(lambda: json.loads(redis_client.hget(replica_key, "failed") or "{}"))
    assert "sql@v2" in failed
    assert "sql@v2" not in json.loads(redis_client.hget(replica_key, "adapters"))
    assert client.completions.create(model="sql@v1", **prompt).choices[0].text == tuned  # still served
    AdapterRegistry(redis_client, server.service).retire([broken])
    assert v1.name == "sql@v1"


def test_not_ready_queue_full_and_api_key(tiny_llama_dir, redis_url):
    config = ApiConfig(redis_url=redis_url, service=unique_service(), model_name="tiny", max_queued_requests=0,
                       api_key="secret")
    app = create_app(config)
    with ServerThread(app, None) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="secret", max_retries=0)
        with pytest.raises(openai.InternalServerError) as loading:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert loading.value.status_code == 503
        assert httpx.get(f"{base_url}/readyz").status_code == 503
        app.state.api.attach_model(AutoTokenizer.from_pretrained(tiny_llama_dir), 256)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_redis_down_gives_503(tiny_llama_dir):
    from .conftest import free_port

    app = create_app(ApiConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", service="x", model_name="tiny"))
    app.state.api.attach_model(AutoTokenizer.from_pretrained(tiny_llama_dir), 256)
    with ServerThread(app, None) as base_url:
        reply = httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=30)
        assert reply.status_code == 503 and "unreachable" in reply.json()["error"]["message"]
        assert httpx.get(f"{base_url}/metrics").status_code == 200


MALFORMED_BODIES = [
    b"{not json", b"[]", b'"text"', b"null", b"\xff\xfe{}",
    b'{"model": "tiny", "prompt": 5}', b'{"model": "tiny", "prompt": "hi", "max_tokens": "many"}',
    b'{"model": "tiny", "prompt": "hi", "max_tokens": -3}', b'{"model": "tiny", "prompt": "hi", "max_tokens": 0}',
    b'{"model": "tiny", "prompt": "hi", "max_tokens": 1e400}',
    b'{"model": "tiny", "prompt": "hi", "temperature": 1e400}',
    b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', b'{"model": "tiny", "prompt": "hi", "top_p": 0}',
    b'{"model": "tiny", "prompt": "hi", "seed": 100000000000000000000000000000}',
    b'{"model": "tiny", "prompt": "hi", "top_k": 100000000000000000000000000000}',
    b'{"model": "tiny", "prompt": "hi", "presence_penalty": 2.5}', b'{"model": "tiny", "prompt": "hi", "min_p": 2}',
    b'{"model": "tiny", "prompt": "hi", "repetition_penalty": 0}',
    b'{"model": "tiny", "prompt": "hi", "frequency_penalty": Infinity}',
    b'{"model": "tiny", "prompt": "hi", "n": 2}', b'{"model": "tiny", "prompt": "hi", "n": 1000000}',
    b'{"model": "tiny", "prompt": "hi", "logprobs": 21}', b'{"model": "tiny", "prompt": "hi", "stop": [""]}',
    b'{"model": "tiny", "prompt": "hi", "stop": ' + json.dumps(["x"] * 100).encode() + b"}",
    b'{"model": "tiny", "prompt": "hi", "stream_options": 5}', b'{"model": "tiny", "prompt": [-1]}',
    b'{"model": "tiny", "prompt": [1000000000]}', b'{"model": "tiny", "prompt": []}',
    b'{"model": "tiny", "prompt": [[1, 2], [3]]}', b'{"model": "tiny", "prompt": "hi", "echo": true}',
    b'{"model": "tiny", "prompt": "\\ud800"}', b'{"model": "tiny", "prompt": "hi", "stop": "\\udfff"}',
    b'{"model": "tiny", "prompt": "hi", "user": {"a": [1, {"b": null}]}}',
    b'{"model": ["tiny"], "prompt": "hi"}', b'{"model": "no-such-model", "prompt": "hi"}',
]
MALFORMED_CHATS = [
    b'{"model": "tiny", "messages": []}', b'{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": [[1]]}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": -1}',
    b'{"model": "tiny", "messages": "hi"}', b'{"model": "tiny", "messages": [null]}',
]


def test_malformed_bodies_get_4xx_json_and_the_server_keeps_serving(server, client):
    for path, bodies in (("/v1/completions", MALFORMED_BODIES), ("/v1/chat/completions", MALFORMED_CHATS)):
        for body in bodies:
            reply = httpx.post(f"{server.base_url}{path}", content=body, timeout=30,
                               headers={"content-type": "application/json"})
            assert 400 <= reply.status_code < 500, (body, reply.status_code, reply.text)
            assert reply.json()["error"]["message"] and reply.headers["x-request-id"], body
    surrogate = httpx.post(f"{server.base_url}/v1/completions", content=b'{"model": "tiny", "prompt": "a\\ud800"}',
                           headers={"content-type": "application/json"}, timeout=30)
    assert surrogate.status_code == 400 and "not valid Unicode" in surrogate.json()["error"]["message"]
    assert client.completions.create(model="tiny", prompt="still there?", max_tokens=3).usage.completion_tokens >= 1


def _series(base_url: str) -> set[str]:
    return {line.split(" ")[0] for line in httpx.get(f"{base_url}/metrics").text.splitlines()
            if line.startswith("flexllm_requests_total{")}


def test_unknown_paths_and_unauthenticated_requests_add_no_series(tiny_llama_dir, redis_url):
    app = create_app(ApiConfig(redis_url=redis_url, service=unique_service(), model_name="tiny", api_key="secret"))
    with ServerThread(app, None) as base_url:
        def probe(tag: str) -> None:
            for i in range(15):
                httpx.get(f"{base_url}/{tag}-{i}/x?y={i}")
                httpx.post(f"{base_url}/v1/{tag}{i}", json={})
                httpx.get(f"{base_url}/v1/models", headers={"authorization": f"Bearer {tag}{i}"})
                httpx.delete(f"{base_url}/v1/completions")
            httpx.get(f"{base_url}/metrics")

        probe("first")
        before = _series(base_url)
        probe("second")
        assert _series(base_url) == before
        assert before == {'flexllm_requests_total{endpoint="other",status="404"}',
                          'flexllm_requests_total{endpoint="/v1/models",status="401"}',
                          'flexllm_requests_total{endpoint="/v1/completions",status="405"}',
                          'flexllm_requests_total{endpoint="/metrics",status="200"}'}


def test_unexpected_error_is_500_json_with_the_request_id_in_the_log(tiny_llama_dir, redis_url, redis_client,
                                                                     caplog):
    """A corrupt output chunk in Redis is an error no handler expects."""
    service = unique_service()
    app = create_app(ApiConfig(redis_url=redis_url, service=service, model_name="tiny"))
    app.state.api.attach_model(AutoTokenizer.from_pretrained(tiny_llama_dir), 256)
    with ServerThread(app, None) as base_url:
        replies = []
        sender = threading.Thread(target=lambda: replies.append(httpx.post(
            f"{base_url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)))
        sender.start()
        entries = _wait(lambda: redis_client.xrange(request_stream(service)))
        request_id = json.loads(entries[0][1]["data"])["request_id"]
        redis_client.xadd(output_stream(service, request_id), {"data": "{corrupt"})
        sender.join(timeout=60)
    reply = replies[0]
    assert reply.status_code == 500 and reply.json()["error"]["type"] == "InternalServerError"
    request_id = reply.headers["x-request-id"]
    assert request_id in reply.json()["error"]["message"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].levelname == "ERROR" and logged[0].exc_info is not None
