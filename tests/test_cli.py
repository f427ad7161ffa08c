"""The `flexllm` command line against a real embedded Redis: errors as one line, job cancel/delete, which
Redis a client command talks to, and what `--help` shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from flexllm.worker import protocol
from flexllm.worker.cli import main
from flexllm.worker.net import free_port
from flexllm.worker.queue.connection import connect
from flexllm.worker.queue.jobs import JobQueue, JobSubmission
from flexllm.worker.redis_server import EmbeddedRedis, EmbeddedState, running_states, state_dir, write_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as url:
        yield url


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """No state files of servers running elsewhere on this machine; no Redis URL from the environment."""
    monkeypatch.setenv("FLEXLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLEXLLM_REDIS_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "400")  # rich's tables: no wrapped cells


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Redis: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def job_file(tmp_path: Path, service: str, source: str | None = None, name: str = "tune") -> Path:
    manifest = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["inferenceService"] = service
    manifest["spec"]["dataset"]["source"] = source or f"file://{REPO / 'examples/data/tiny.jsonl'}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_bad_yaml_missing_file_and_bad_spec_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: FinetuneJob\nspec: [unclosed\n")
    code, _, err = run(capsys, "submit", "-f", str(bad), "--redis-url", "redis://127.0.0.1:1")
    assert code == 1 and "not valid YAML" in one_line_error(err)
    code, _, err = run(capsys, "submit", "-f", str(tmp_path / "missing.yaml"))
    assert code == 1 and "missing.yaml: No such file" in one_line_error(err)
    invalid = job_file(tmp_path, "svc")
    manifest = yaml.safe_load(invalid.read_text())
    manifest["spec"]["training"]["learningRate"] = -1
    invalid.write_text(yaml.safe_dump(manifest))
    code, _, err = run(capsys, "submit", "-f", str(invalid))
    assert code == 1 and "training.learningRate" in one_line_error(err)


def test_submit_checks_a_local_dataset_before_queueing(capsys, tmp_path, tiny_llama_dir, redis_url):
    service = f"svc-{uuid.uuid4().hex[:8]}"
    missing = job_file(tmp_path, service, source="file:///nowhere/data.jsonl")
    code, _, err = run(capsys, "submit", "-f", str(missing), "--redis-url", redis_url, "--model", str(tiny_llama_dir))
    assert code == 1 and "/nowhere/data.jsonl" in one_line_error(err)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "no prompt"}\nnot json\n')
    code, _, err = run(capsys, "submit", "-f", str(job_file(tmp_path, service, source=str(broken))),
                       "--redis-url", redis_url, "--model", str(tiny_llama_dir))
    assert code == 1 and "no valid prompt-completion line" in one_line_error(err)
    assert not connect(redis_url).exists(protocol.job_stream(service))  # nothing was queued
    code, out, _ = run(capsys, "submit", "-f", str(missing), "--redis-url", redis_url, "--no-dataset-check")
    assert code == 0 and f"queued on service {service}" in out


def test_unreachable_redis_and_no_server_are_one_line(capsys, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}"
    for argv in (["jobs", "--redis-url", dead], ["jobs", "--redis-url", dead, "cancel", "x"],
                 ["submit", "-f", str(job_file(tmp_path, "s")), "--no-dataset-check", "--redis-url", dead]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "unreachable" in one_line_error(err), argv
    code, _, err = run(capsys, "jobs")  # no --redis-url and no `flexllm serve` here
    assert code == 1 and "no `flexllm serve`" in one_line_error(err)


def test_unserved_service_is_reported_by_submit_and_jobs(capsys, tmp_path, redis_url):
    service = f"svc-{uuid.uuid4().hex[:8]}"
    code, out, err = run(capsys, "submit", "-f", str(job_file(tmp_path, service)), "--redis-url", redis_url,
                         "--no-dataset-check")
    assert code == 0 and f"queued on service {service}" in out
    assert f"no replica serves service {service!r}" in err
    code, out, _ = run(capsys, "jobs", "--redis-url", redis_url, "--service", service)
    assert code == 0 and "no replica serves" in out
    code, _, err = run(capsys, "submit", "-f", str(job_file(tmp_path, service)), "--redis-url", redis_url,
                       "--no-dataset-check")
    assert code == 1 and "already exists" in one_line_error(err)


def test_jobs_cancel_and_delete(capsys, redis_url):
    client = connect(redis_url)
    service = f"svc-{uuid.uuid4().hex[:8]}"
    queue = JobQueue(client, service)
    for name in ("a", "b"):
        assert queue.submit(JobSubmission(name, "default", {"dataset": {"source": "x"}}))
    code, out, _ = run(capsys, "jobs", "--redis-url", redis_url, "cancel", "a")
    assert code == 0 and "cancelled" in out
    assert queue.progress("a").phase == "Cancelled" and queue.is_cancelled("a")
    code, out, _ = run(capsys, "jobs", "--redis-url", redis_url, "delete", "b")
    assert code == 0 and "deleted" in out
    assert not client.exists(protocol.job_progress(service, "b"))
    names = [json.loads(f["data"])["name"] for _, f in client.xrange(protocol.job_stream(service))]
    assert names == ["a"]  # b's entry, never taken by an engine, is gone too
    code, _, err = run(capsys, "jobs", "--redis-url", redis_url, "delete", "b")
    assert code == 1 and "no job 'b'" in one_line_error(err)


def test_job_table_rounds_loss_and_gives_eta_a_unit(capsys, redis_url):
    client = connect(redis_url)
    service = f"svc-{uuid.uuid4().hex[:8]}"
    queue = JobQueue(client, service)
    queue.submit(JobSubmission("t", "default", {}))
    queue.set_progress("t", phase="Running", step=3, total_steps=16, loss=1.234567891, eta_seconds=125)
    code, out, _ = run(capsys, "jobs", "--redis-url", redis_url, "--service", service)
    assert code == 0 and "1.235" in out and "1.2345" not in out and "2m5s" in out


def test_client_commands_find_the_running_servers_redis_by_port(capsys, redis_url):
    code, _, err = run(capsys, "jobs")
    assert code == 1
    write_state(EmbeddedState(redis_url, "one", 8101, os.getpid()))
    code, _, err = run(capsys, "jobs")
    assert code == 0 and f"Redis: {redis_url}" in err and "port 8101" in err
    write_state(EmbeddedState(redis_url, "two", 8102, os.getpid()))
    code, _, err = run(capsys, "jobs")
    assert code == 1 and "several" in one_line_error(err)
    code, _, err = run(capsys, "jobs", "--port", "8102")
    assert code == 0 and "service 'two'" in err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_state(EmbeddedState(f"redis://127.0.0.1:{free_port()}", "gone", 8103, int(dead.stdout)))
    assert sorted(s.service for s in running_states()) == ["one", "two"]  # the dead server's file is removed
    assert not (state_dir() / "gone-8103.json").exists()


def test_help_lists_every_command_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in ("demo", "serve", "worker", "generate", "submit", "jobs"))
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8000)" in text and "(default: 5000.0)" in text and "sized for a GPU" in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "measured" in text and "(default: 240.0)" in text


def test_serve_on_a_port_in_use_fails_before_starting_anything(capsys, tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "serve", "--host", "127.0.0.1", "--port", str(port))
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in one_line_error(err)
    assert not (tmp_path / "cache" / "embedded-redis").exists()  # no embedded Redis was started


def test_jobs_cancel_and_delete_refuse_invalid_names(capsys, redis_url):
    for action in ("cancel", "delete"):
        for name in ("x:cancel", "a/b", "..", "bad\n", "x" * 300):
            code, _, err = run(capsys, "jobs", "--redis-url", redis_url, action, name)
            assert code == 1 and "job" in one_line_error(err) and "no job" not in err
