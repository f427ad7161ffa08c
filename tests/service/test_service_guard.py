"""Nothing a client sends stops the engine: edge parameters, non-finite logits, bad names at every
entrance, poison requests and jobs (dead-lettered after ``max_deliveries``)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import kopf
import openai
import pytest
import yaml

from flexllm.worker import protocol
from flexllm.worker.adapters.registry import AdapterRegistry
from flexllm.worker.adapters.store import AdapterStore
from flexllm.worker.api.app import ApiConfig, create_app
from flexllm.worker.cli import main as cli_main
from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.coserve.policy import SLO
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.protocol import JobCancel
from flexllm.worker.queue.deadletter import dead_letters
from flexllm.worker.queue.intake import JobIntake
from flexllm.worker.queue.jobs import JobQueue, JobSubmission
from flexllm.worker.queue.messages import InferenceRequest
from flexllm.worker.queue.requests import RequestConsumer
from flexllm.worker.serving import ServingLoop
from tests.engine.test_engine_errors import write_nan_adapter

from .conftest import RecordingJobHandler, ServerThread, run_loop_in_thread, unique_service

REPO = Path(__file__).resolve().parents[2]

BAD_NAMES = ["x:cancel", "a/b", "..", "tiny-lora\n", "a" * 300]
JOB_SPEC = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())["spec"]


def complete(base_url: str, **body) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": "Hello there", **body},
                      timeout=60)


def test_edge_sampling_parameters_get_a_completion_or_400_and_the_next_request_is_served(server):
    greedy = complete(server.base_url, max_tokens=6, temperature=0)
    assert greedy.status_code == 200, greedy.text
    tiny = complete(server.base_url, max_tokens=6, temperature=1e-30)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    for field, value in [("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN"),
                         ("seed", str(2**70))]:
        raw = f'{{"model": "tiny", "prompt": "Hi", "max_tokens": 4, "{field}": {value}}}'
        response = httpx.post(f"{server.base_url}/v1/completions", content=raw,
                              headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == 400, (field, value, response.text)
        assert field in response.json()["error"]["message"]
    again = complete(server.base_url, max_tokens=6, temperature=0)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_non_finite_logits_fail_only_their_request(server, redis_client, tiny_llama_dir, tmp_path):
    """An adapter with NaN weights (a diverged run) fails its requests; the base model's requests in
    the same batches complete as before."""
    version = AdapterStore(server.adapter_dir).publish_folder("diverged", write_nan_adapter(tiny_llama_dir,
                                                                                            tmp_path / "nan"))
    AdapterRegistry(redis_client, server.service).register(version)
    expected = complete(server.base_url, max_tokens=24, temperature=0, ignore_eos=True).json()["choices"][0]["text"]
    with ThreadPoolExecutor(4) as pool:
        broken = [pool.submit(complete, server.base_url, model="diverged", max_tokens=24) for _ in range(2)]
        good = [pool.submit(complete, server.base_url, max_tokens=24, temperature=0, ignore_eos=True)
                for _ in range(2)]
        for future in broken:
            response = future.result(timeout=120)
            assert response.status_code == 500, response.text
            assert "non-finite logits" in response.json()["error"]["message"]
        assert [f.result(timeout=120).json()["choices"][0]["text"] for f in good] == [expected] * 2
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError, match="non-finite"):
        list(client.completions.create(model="diverged", prompt="Hi", max_tokens=8, stream=True))
    assert complete(server.base_url, max_tokens=24, temperature=0, ignore_eos=True).json()["choices"][0]["text"] \
        == expected


# -- names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_rejected_by_the_api(server, name):
    response = complete(server.base_url, model=name, max_tokens=2)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "model" and "invalid adapter name" in error["message"]
    assert complete(server.base_url, model=f"{name}@v1", max_tokens=2).status_code == 400


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_rejected_by_cli_submit(name, redis_url, redis_client, tmp_path, capsys):
    service = unique_service()
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({"kind": "FinetuneJob", "metadata": {"name": name},
                                        "spec": JOB_SPEC | {"inferenceService": service}}))
    assert cli_main(["submit", "-f", str(manifest), "--redis-url", redis_url, "--no-dataset-check"]) == 1
    message = capsys.readouterr().err
    assert "invalid job name" in message and message.count("\n") == 1  # one line
    assert not redis_client.exists(protocol.job_stream(service))  # nothing was queued


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_rejected_by_the_operator_handlers(name):
    from flexllm.operator import finetunejob, inferenceservice

    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError, match="invalid job name"):
        finetunejob.submit(spec=JOB_SPEC | {"inferenceService": "smollm2"}, name=name, namespace="default",
                           body={}, meta={}, status={}, patch=patch, memo=None, retry=0)
    assert patch["status"]["phase"] == "Failed"
    assert patch["status"]["conditions"][0]["reason"] == "InvalidName"
    spec = yaml.safe_load((REPO / "examples" / "inferenceservice.yaml").read_text())["spec"]
    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError, match="invalid InferenceService name"):
        inferenceservice.reconcile(spec=spec, name=name, namespace="default", body={}, meta={}, status={},
                                   patch=patch, memo=None, logger=None)
    assert patch["status"]["phase"] == "Failed"


def test_bad_job_names_are_dead_lettered_by_the_worker_intake_which_goes_on(server, redis_client):
    """Job entries written straight into the stream (not through an entrance that checks) reach the
    worker: `x:cancel` would be job x's cancel flag (a string: WRONGTYPE for a progress hash)."""
    queue = JobQueue(redis_client, server.service)
    queue.submit(JobSubmission("x", "default", JOB_SPEC | {"training": {"learningRate": -1}}))  # fails at once
    queue.cancel("x")
    for name in BAD_NAMES:
        redis_client.xadd(queue.stream, {"data": json.dumps({"name": name, "namespace": "default", "spec": JOB_SPEC})})
    deadline = time.monotonic() + 30
    while len(dead_letters(redis_client, server.service)) < len(BAD_NAMES):
        assert time.monotonic() < deadline, dead_letters(redis_client, server.service)
        time.sleep(0.1)
    records = dead_letters(redis_client, server.service)[-len(BAD_NAMES):]
    assert [json.loads(r["data"])["name"] for r in records] == BAD_NAMES
    assert all("invalid job name" in r["error"] for r in records)
    assert queue.cancellation("x") == JobCancel()  # untouched
    assert not redis_client.exists(protocol.job_progress(server.service, "tiny-lora\n"))
    assert complete(server.base_url, max_tokens=4).status_code == 200


# -- poison messages ----------------------------------------------------------------------------------
def wait_until(condition, timeout: float, what: str, *args) -> None:
    deadline = time.monotonic() + timeout
    while not condition(*args):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_poison_request_is_dead_lettered_after_max_deliveries_across_two_consumers(
        tiny_llama_dir, redis_url, redis_client):
    """Each consumer takes the request, streams a little and then stops answering, as a process killed
    by the request would (its engine and loop are dropped, nothing acknowledged): engines a, b, a, b.
    The fourth delivery is over the limit of 3: dead-lettered, and the client gets an error."""
    service = unique_service()
    app = create_app(ApiConfig(redis_url=redis_url, service=service, model_name="tiny"))
    from transformers import AutoTokenizer

    app.state.api.attach_model(AutoTokenizer.from_pretrained(tiny_llama_dir), 256)
    result: dict = {}

    def client_call(base_url: str) -> None:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        parts = []
        try:
            for chunk in client.completions.create(model="tiny", prompt="poison", max_tokens=200, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
                parts.append(chunk.choices[0].text)
        except openai.APIError as error:
            result["error"] = error
        result["text"] = "".join(parts)

    stream = protocol.request_stream(service)
    with ServerThread(app, None) as base_url:
        caller = threading.Thread(target=client_call, args=(base_url,))
        caller.start()
        wait_until(lambda: redis_client.exists(stream) and redis_client.xlen(stream) == 1, 30, "the request")
        for attempt, name in enumerate(["engine-a", "engine-b", "engine-a", "engine-b"], start=1):
            engine = LLMEngine(model=str(tiny_llama_dir), max_model_len=256, num_kv_blocks=64)
            loop = ServingLoop(CoServingEngine(engine, SLO()),
                               RequestConsumer(redis_client, service, name, reclaim_idle_ms=200), idle_block_ms=50)
            loop.requests.ensure_group()
            wait_until(took_or_dropped, 30, f"delivery {attempt}", loop, redis_client, stream)
            if attempt <= protocol.MAX_DELIVERIES:
                assert loop.active, "the request was dead-lettered too early"
                loop.run_once()  # stream a token or two, then stop answering
                pending = redis_client.xpending_range(stream, protocol.ENGINE_GROUP, "-", "+", 10)
                assert [p["times_delivered"] for p in pending] == [attempt]
        caller.join(timeout=60)
    assert not caller.is_alive()
    assert isinstance(result["error"], openai.APIError) and "dead-letter" in str(result["error"])
    assert result["text"], "the tokens streamed before the consumers stopped arrived"
    assert redis_client.xlen(stream) == 0  # acknowledged and deleted
    [record] = dead_letters(redis_client, service)
    assert record["stream"] == stream and int(record["deliveries"]) == protocol.MAX_DELIVERIES + 1
    assert json.loads(record["data"])["prompt_token_ids"] and "delivered 4 times" in record["error"]


def took_or_dropped(loop: ServingLoop, redis_client, stream: str) -> bool:
    """One iteration; True once the request is in the loop's engine or gone from the stream."""
    loop.run_once()
    return bool(loop.active) or redis_client.xlen(stream) == 0


def test_a_poison_job_is_dead_lettered_and_failed_after_max_deliveries(redis_client):
    queue = JobQueue(redis_client, unique_service())
    queue.ensure_group()
    assert queue.submit(JobSubmission("poison", "default", JOB_SPEC))
    for attempt, name in enumerate(["engine-a", "engine-b", "engine-a"], start=1):
        handler = RecordingJobHandler()
        intake = JobIntake(queue, name, handler, FinetuneJobSpec.model_validate, reclaim_idle_ms=100)
        wait_until(intake.poll, 10, f"delivery {attempt}")
        assert [name for name, _ in handler.accepted] == ["poison"]
    last = JobIntake(queue, "engine-b", RecordingJobHandler(), FinetuneJobSpec.model_validate, reclaim_idle_ms=100)
    wait_until(lambda: last.poll() == 0 and queue.progress("poison").phase == "Failed", 10, "delivery 4")
    assert last.handler.accepted == []
    progress = queue.progress("poison")
    assert progress.phase == "Failed" and "delivered 4 times" in progress.message
    [record] = dead_letters(redis_client, queue.service)
    assert json.loads(record["data"])["name"] == "poison" and record["stream"] == queue.stream
    assert redis_client.xlen(queue.stream) == 0 and queue.depth() == 0


def test_one_failed_iteration_is_survived_repeated_ones_stop_the_loop(tiny_llama_dir, redis_client):
    """A real whole-iteration failure: the request stream's key is overwritten by a string (WRONGTYPE on
    every read). Once is survived and the loop serves again after the key is repaired; three in a row
    raise ``EngineBroken`` (the process exits and its supervisor restarts it)."""
    service = unique_service()
    stream = protocol.request_stream(service)
    engine = LLMEngine(model=str(tiny_llama_dir), max_model_len=128, num_kv_blocks=16)
    loop = ServingLoop(CoServingEngine(engine, SLO()), RequestConsumer(redis_client, service, "engine-a"),
                       idle_block_ms=20)
    def clobber() -> None:
        redis_client.delete(stream)
        redis_client.set(stream, "clobbered")

    thread, stop, outcome = run_loop_in_thread(loop)
    wait_until(redis_client.exists, 10, "the consumer group", stream)
    clobber()
    wait_until(lambda: loop.failures == 1, 10, "a failed iteration")
    redis_client.delete(stream)
    loop.requests.ensure_group()
    request = InferenceRequest("cmpl-after", [10, 11, 12], {"max_tokens": 3, "temperature": 0})
    redis_client.xadd(stream, {"data": request.to_json()})
    out = protocol.output_stream(service, "cmpl-after")
    wait_until(lambda: any(json.loads(f["data"])["finished"] for _, f in redis_client.xrange(out)), 30, "a reply")
    assert loop.failures == 0 and thread.is_alive()
    clobber()
    thread.join(timeout=30)
    stop.set()
    assert not thread.is_alive()
    assert "3 engine iterations failed in a row" in str(outcome["error"])
    assert "WRONGTYPE" in str(outcome["error"])


def test_pinned_adapter_names_are_checked_by_the_operator(tmp_path):
    from flexllm.operator import inferenceservice

    spec = yaml.safe_load((REPO / "examples" / "inferenceservice.yaml").read_text())["spec"]
    for bad in ("a" * 100, "a..b", "x:cancel"):
        spec["adapters"] = [{"name": bad, "uri": "pvc://adapters/a"}]
        patch = kopf.Patch()
        with pytest.raises(kopf.PermanentError, match=r"adapters\.0\.name"):
            inferenceservice.reconcile(spec=spec, name="smollm2", namespace="default", body={}, meta={}, status={},
                                       patch=patch, memo=None, logger=None)
        assert patch["status"]["conditions"][0]["reason"] == "InvalidSpec"
