"""Model FLOPs utilisation: the model's FLOPs per second over what this device's matmuls reach in the dtype
the run computes in (bf16 units and fp32 ones differ 2-8x, so one fixed peak would say little).

The peak is measured, not read from a spec sheet: a large square matmul, best of a few, at the run's thread
count (0.1-0.5 s once per process). FLOPs count each document at its own length (attention is causal within a
document), as benchmarks/train_throughput.py counts them.
"""
from __future__ import annotations

import functools
import time

import torch

from ..config import ModelConfig
from ..model.transformer import flops_per_token

PEAK_SIZE = 2048  # large enough for the matrix units to run at full rate, small enough for a quick probe


@functools.cache  # per process: the hardware and thread count do not change under a run
def matmul_peak(dtype: torch.dtype, device_type: str = "cpu", threads: int = 0) -> float:
    """FLOP/s of a PEAK_SIZE square matmul in `dtype`, best of 5 after a warm-up. `threads` is only part of
    the cache key (pass torch.get_num_threads()), so a changed thread count measures again."""
    device = torch.device(device_type)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(PEAK_SIZE, PEAK_SIZE, generator=gen).to(device, dtype)
    b = torch.randn(PEAK_SIZE, PEAK_SIZE, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    with torch.inference_mode():
        for rep in range(6):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            if rep:
                best = min(best, time.perf_counter() - t0)
    return 2 * PEAK_SIZE ** 3 / best


def step_flops(cfg: ModelConfig, seqlens: list[int]) -> float:
    """Forward + backward FLOPs of one micro-batch whose documents have these lengths."""
    return sum(n * flops_per_token(cfg, n) for n in seqlens)
