"""Kernel tests run the Triton kernels on CPU tensors through the interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit runs: before any kernel module import
