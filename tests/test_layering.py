"""Layering: worker/queue/ is the Redis side of the worker only (no engine, co-serving or torch module),
and worker/engine/ knows nothing of co-serving (it offers ``demand`` and ``step``; the serving loop,
``worker/serving.py``, joins the parts)."""

import pkgutil
import subprocess
import sys

import flexllm.worker.engine as engine
import flexllm.worker.queue as queue


def imported_with(package) -> tuple[list[str], list[str]]:
    """(the package's modules, every module loaded once they are all imported in a fresh interpreter)."""
    modules = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=True).stdout.split()
    assert set(modules) <= set(loaded)
    return modules, loaded


def test_queue_modules_import_no_engine_coserve_or_torch():
    modules, loaded = imported_with(queue)
    assert "flexllm.worker.queue.intake" in modules
    forbidden = [m for m in loaded
                 if m == "torch" or m.startswith(("torch.", "flexllm.worker.engine", "flexllm.worker.coserve"))]
    assert forbidden == []


def test_engine_modules_import_no_coserve():
    modules, loaded = imported_with(engine)
    assert "flexllm.worker.engine.llm_engine" in modules
    assert [m for m in loaded if m.startswith("flexllm.worker.coserve")] == []
