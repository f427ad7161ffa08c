"""Installs the top-level folders under the `flexllm` namespace.

`operator/`, `worker/` and `kernels/` become `flexllm.operator`, `flexllm.worker` and
`flexllm.kernels`. `operator/` and `kernels/` have no `__init__.py` on purpose: from the repository
root (`python -m ...` puts it first on sys.path) a regular package named `operator` would shadow the
standard library's (`python -m pip` would crash in a fresh venv), and one named `kernels` the
`kernels` distribution that transformers >= 5 imports; as namespace folders they never win over an
installed module, and installed they are `flexllm.operator` and `flexllm.kernels`
(tests/test_packaging.py keeps it so).
"""

from setuptools import find_namespace_packages, setup

TOP_LEVEL = ("operator", "worker", "kernels")

setup(
    packages=[f"flexllm.{name}" for name in find_namespace_packages(include=[f"{t}*" for t in TOP_LEVEL])
              if "__pycache__" not in name],
    package_dir={f"flexllm.{t}": t for t in TOP_LEVEL},
    package_data={"flexllm.worker": ["py.typed"]},
)
