"""The roofline here: a measured dense matmul FLOP/s at the benchmark's dtype (MFU is quoted against it)."""

from __future__ import annotations

import statistics
import time

import torch

from ..runtime.device import sync


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> dict:
    """The roofline here: FLOP/s of an n x n by n x n matmul (2 n^3 FLOPs), timed `repeats` times
    after warm-up. Machines shared with other work (these CPUs) vary from one repeat to the next, so
    the spread is reported beside the median; MFU is quoted against the median.
    Returns {"median", "min", "max": FLOP/s, "samples": one per repeat, "n", "repeats"}."""
    n = n or (8192 if device.type != "cpu" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        samples.append(2 * n**3 / (time.perf_counter() - t0))
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples,
            "n": n, "repeats": repeats}
