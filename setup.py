"""Installs the top-level folders under the `flexllm` namespace.

`operator/`, `worker/` and `kernels/` become `flexllm.operator`, `flexllm.worker` and
`flexllm.kernels`; a bare `operator` package would shadow the standard library.
"""

from setuptools import find_packages, setup

TOP_LEVEL = ("operator", "worker", "kernels")

setup(
    packages=[f"flexllm.{name}" for name in find_packages(include=[f"{t}*" for t in TOP_LEVEL])],
    package_dir={f"flexllm.{t}": t for t in TOP_LEVEL},
    package_data={"flexllm.worker": ["py.typed"]},
)
