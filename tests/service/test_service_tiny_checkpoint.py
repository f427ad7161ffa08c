"""Any checkpoint starts: `flexllm serve` and `generate` on a 300-token vocabulary and a 128-token context.

The server runs as a real subprocess on loopback with its own embedded Redis (no --redis-url), as a
user starts it; its start-up profiling pass must stay inside the model's vocabulary and context.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from ..conftest import stop_process_group
from .conftest import free_port, unique_service

READY_TIMEOUT_S = 120


def test_serve_on_a_small_vocabulary_short_context_checkpoint_becomes_ready_and_answers(small_vocab_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "FLEXLLM_CACHE": str(tmp_path / "cache")}
    env.pop("FLEXLLM_REDIS_URL", None)
    command = [sys.executable, "-m", "flexllm.worker.cli", "serve", "--model", str(small_vocab_dir),
               "--served-model-name", "tiny", "--service", unique_service(), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--dtype", "float32",
               "--adapter-dir", str(tmp_path / "adapters")]
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, f"serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve never became ready:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        reply = httpx.post(f"{base}/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "Hello world", "max_tokens": 5, "temperature": 0})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] >= 1 and isinstance(body["choices"][0]["text"], str)
        assert "kv cache sizing: 512 bytes per token" in log.read_text()  # 2 layers x 2 kv heads x 16 x fp32, K+V
    finally:
        stop_process_group(process)


def test_generate_with_a_128_token_model_len(small_vocab_dir):
    out = subprocess.run([sys.executable, "-m", "flexllm.worker.cli", "generate", "--model", str(small_vocab_dir),
                          "--max-model-len", "128", "--prompt", "Hello world", "--max-tokens", "5",
                          "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "64 sequences x 128 tokens use at most 512: 512 blocks" in out.stderr
