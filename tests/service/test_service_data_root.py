"""Datasets live under the worker's data root: a FinetuneJob naming any other file (absolute path,
``file://``, ``..``, a symlink out of the root) fails with a message that does not tell whether the
file exists, and the worker goes on serving; a dataset inside the root trains."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flexllm.worker.queue.jobs import JobQueue, JobSubmission

from .conftest import RunningServer, start_server, wait_ready
from .test_service_finetune import job_spec, wait_for

ROWS = [{"prompt": f"Q{i}: {i} + 1 =", "completion": f" {i + 1}"} for i in range(8)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(the data root, a folder outside it), each with a valid ``train.jsonl``; links in the root lead out."""
    root, outside = tmp_path_factory.mktemp("data-root"), tmp_path_factory.mktemp("outside")
    for folder in (root, outside):
        (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (root / "link.jsonl").symlink_to(outside / "train.jsonl")
    (root / "dangling.jsonl").symlink_to(outside / "missing.jsonl")
    (root / "outside").symlink_to(outside, target_is_directory=True)
    return root, outside


@pytest.fixture(scope="module")
def rooted_server(tiny_llama_dir, redis_url, tmp_path_factory, folders) -> Iterator[RunningServer]:
    adapter_dir = tmp_path_factory.mktemp("adapters")
    threads, app, service, worker = start_server(tiny_llama_dir, redis_url, adapter_dir, data_dirs=[str(folders[0])])
    with threads as base_url:
        wait_ready(base_url)
        yield RunningServer(base_url, app, service, adapter_dir, redis_url, worker)


def run_job(server: RunningServer, redis_client, name: str, source: str) -> dict:
    queue = JobQueue(redis_client, server.service)
    spec = job_spec("unused", max_steps=2, every=2) | {"dataset": {"source": source, "format": "prompt-completion"}}
    assert queue.submit(JobSubmission(name, "default", spec))
    wait_for(lambda: queue.progress(name).phase in ("Failed", "Succeeded"), 120, f"job {name} to end")
    return queue.progress(name)


def test_datasets_outside_the_root_fail_alike_whether_or_not_they_exist(rooted_server, redis_client, folders):
    root, outside = folders
    pairs = {  # kind -> (an existing file, a missing one), both outside the root
        "absolute": (str(outside / "train.jsonl"), str(outside / "missing.jsonl")),
        "file-uri": (f"file://{outside}/train.jsonl", f"file://{outside}/missing.jsonl"),
        "dotdot": (f"file://{root}/../{outside.name}/train.jsonl", f"file://{root}/../{outside.name}/missing.jsonl"),
        "symlink": (str(root / "link.jsonl"), str(root / "dangling.jsonl")),
        "symlinked-folder": (str(root / "outside" / "train.jsonl"), str(root / "outside" / "missing.jsonl")),
        "system": ("/etc/passwd", "/etc/no-such-file"),
    }
    messages = set()
    for kind, sources in pairs.items():
        for index, source in enumerate(sources):
            progress = run_job(rooted_server, redis_client, f"{kind}-{index}", source)
            assert progress.phase == "Failed", (source, progress)
            messages.add(progress.message.replace(source, "<source>"))
    assert len(messages) == 1, messages  # one message: nothing tells an existing file from a missing one
    assert str(root) in messages.pop()
    body = {"model": "tiny", "prompt": "still serving?", "max_tokens": 2}
    assert httpx.post(f"{rooted_server.base_url}/v1/completions", json=body, timeout=60).status_code == 200


def test_dataset_inside_the_root_trains(rooted_server, redis_client, folders):
    root, _ = folders
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "inner.jsonl").symlink_to(root / "train.jsonl")  # a link that stays inside is fine
    for name, source in (("inside", f"file://{root}/train.jsonl"), ("inside-link", str(root / "sub" / "inner.jsonl"))):
        progress = run_job(rooted_server, redis_client, name, source)
        assert progress.phase == "Succeeded", progress
        assert progress.step == 2


def test_data_roots_default_to_the_working_directory_where_relative_sources_resolve(tmp_path, monkeypatch):
    from flexllm.worker.cli import _data_dirs
    from flexllm.worker.finetune.data import DatasetError, dataset_path

    monkeypatch.delenv("FLEXLLM_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert _data_dirs(None) == [str(tmp_path)] and _data_dirs(["/a", "b"]) == ["/a", "b"]
    (tmp_path / "examples").mkdir()
    assert dataset_path("file://examples/t.jsonl", [tmp_path]) == tmp_path / "examples" / "t.jsonl"
    monkeypatch.setenv("FLEXLLM_DATA_DIR", f"/srv/data:{tmp_path}")
    assert _data_dirs(None) == ["/srv/data", str(tmp_path)]
    monkeypatch.setenv("FLEXLLM_DATA_DIR", "")  # set and empty (the operator with no root): no dataset at all
    assert _data_dirs(None) == []
    with pytest.raises(DatasetError, match="none configured"):
        dataset_path("file://examples/t.jsonl", [])
    monkeypatch.delenv("FLEXLLM_DATA_DIR")
    monkeypatch.chdir("/")
    assert _data_dirs(None) == []  # never the whole file system by default
