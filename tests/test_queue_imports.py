"""worker/queue/ is the Redis side of the worker only: importing any of its modules loads no engine,
co-serving or torch module (the serving loop, ``worker/serving.py``, joins the two)."""

import pkgutil
import subprocess
import sys

import flexllm.worker.queue as queue


def test_queue_modules_import_no_engine_coserve_or_torch():
    modules = [f"flexllm.worker.queue.{m.name}" for m in pkgutil.iter_modules(queue.__path__)]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=True).stdout.split()
    assert set(modules) <= set(loaded) and "flexllm.worker.queue.intake" in modules
    forbidden = [m for m in loaded
                 if m == "torch" or m.startswith(("torch.", "flexllm.worker.engine", "flexllm.worker.coserve"))]
    assert forbidden == []
