"""Triton kernels and their launchers; each module imports triton at import time.

Import these lazily (the dispatchers in ``flexllm.kernels`` do). Tests call the ``*_triton``
launchers directly on CPU tensors under ``TRITON_INTERPRET=1``.
"""
