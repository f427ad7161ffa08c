"""`flexllm demo` end to end on the tiny model: embedded Redis, API, co-serving worker, generated load."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_demo_trains_the_example_job_under_load_and_reports(tiny_llama_dir, tmp_path):
    manifest = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())
    manifest["spec"]["training"].update(maxSteps=8, batchTokens=64)
    manifest["spec"]["publish"].update(everySteps=4, keepVersions=2)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(manifest))
    (tmp_path / "examples" / "data").mkdir(parents=True)  # the relative dataset resolves next to the job file
    (tmp_path / "examples" / "data" / "tiny.jsonl").write_text((REPO / "examples/data/tiny.jsonl").read_text())
    # rate and SLOs measured on this machine at start (no --rate): the demo keeps its pace under load
    out = subprocess.run([sys.executable, "-m", "flexllm.worker.cli", "demo", "--model", str(tiny_llama_dir),
                          "-f", str(job), "--output", str(tmp_path / "out"), "--max-seconds", "150"],
                         capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["phase"] == "Succeeded" and summary["steps"] == 8
    assert summary["adapter_versions"] == [f"{manifest['metadata']['name']}@v1", f"{manifest['metadata']['name']}@v2"]
    assert summary["requests"] > 0 and summary["request_errors"] == 0
    assert 0.0 <= summary["slo_attainment"] <= 1.0
    assert not summary["sample"]["completion"].startswith("<")  # the adapter answered
    assert (tmp_path / "out" / "demo.png").stat().st_size > 10_000
    assert "SLO attainment" in out.stdout
    assert "this machine: a lone" in out.stdout and 0 < summary["rate"] <= 4
    assert "fine-tuning tiny-lora: step 8/8 Succeeded" in out.stdout  # plain progress lines: stdout is no tty
