"""Fine-tuning tests: shared builders importable (importlib mode); one intra-op thread.

The units here are many small ops; on a loaded 2-core machine two OpenMP threads spin against
each other and run them ~100x slower than one.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="package")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
