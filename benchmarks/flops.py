"""FLOPs of a lowered program by XLA's cost analysis, and the peak rates that MFU divides by."""

from __future__ import annotations

from typing import Callable
from unittest import mock

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak


def lowered_flops(lower: Callable) -> float:
    """XLA's FLOP count of the program that `lower()` lowers, traced with XLA's attention everywhere.

    XLA's cost analysis counts nothing at all for a program that calls cuDNN's fused attention (0
    for the whole sd15@512 step on an H200), so the count comes from the same arithmetic with the
    attention left to XLA. Lowered, not compiled: on GPU the compiled program's count also leaves out
    the convolutions and matmuls that became cuDNN/cuBLAS calls.
    """
    from apl_jax.nn import attention

    with mock.patch.object(attention, "cudnn_flash_applies", lambda *args, **kwargs: False):
        cost = lower().cost_analysis()
    return float(((cost[0] if isinstance(cost, list) else cost) or {}).get("flops", 0))


def peak_flops(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_kind), None)
