"""Launch helpers shared by the Triton kernels."""

import triton


def row_settings(width: int) -> tuple[int, int]:
    """A whole row of ``width`` elements in one program: (BLOCK, num_warps)."""
    block = triton.next_power_of_2(width)
    return block, 4 if block < 2048 else 8 if block < 8192 else 16


def dot_block(n: int, cap: int | None = None) -> int:
    """Power-of-two tile edge for ``tl.dot`` (>= 16, the MMA minimum) covering n, at most cap."""
    block = max(16, triton.next_power_of_2(n))
    return block if cap is None else min(cap, block)
