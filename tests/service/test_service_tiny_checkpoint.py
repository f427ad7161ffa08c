"""Any checkpoint starts: `flexllm serve` and `generate` on a 300-token vocabulary and a 128-token context.

The server runs as a real subprocess on loopback with its own embedded Redis (no --redis-url), as a
user starts it; its start-up profiling pass must stay inside the model's vocabulary and context.
"""

from __future__ import annotations

import subprocess
import sys

import httpx

from .conftest import free_port, unique_service
from .test_service_lifecycle import flexllm, stop, wait_ready


def test_serve_on_a_small_vocabulary_short_context_checkpoint_becomes_ready_and_answers(small_vocab_dir, tmp_path):
    port = free_port()
    process, log = flexllm(tmp_path, "serve", "serve", "--model", str(small_vocab_dir), "--served-model-name", "tiny",
                           "--service", unique_service(), "--host", "127.0.0.1", "--port", str(port),
                           "--device", "cpu", "--dtype", "float32", "--adapter-dir", str(tmp_path / "adapters"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log)
        reply = httpx.post(f"{base}/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "Hello world", "max_tokens": 5, "temperature": 0})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] >= 1 and isinstance(body["choices"][0]["text"], str)
        assert "kv cache sizing: 512 bytes per token" in log.read_text()  # 2 layers x 2 kv heads x 16 x fp32, K+V
    finally:
        process.terminate()  # a clean stop, its embedded Redis with it
        try:
            process.wait(60)
        finally:
            stop(process)


def test_generate_with_a_128_token_model_len(small_vocab_dir):
    out = subprocess.run([sys.executable, "-m", "flexllm.worker.cli", "generate", "--model", str(small_vocab_dir),
                          "--max-model-len", "128", "--prompt", "Hello world", "--max-tokens", "5",
                          "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "64 sequences x 128 tokens use at most 512: 512 blocks" in out.stderr
