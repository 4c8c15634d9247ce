"""Wall-clock timing for the table: warm up, then best of several runs."""

from __future__ import annotations

import time

import torch


def best_time(fn, min_runs: int = 3, min_seconds: float = 0.3, max_runs: int = 50) -> float:
    """Seconds of the fastest of at least ``min_runs`` calls (and about ``min_seconds``)."""
    fn()  # warm-up: first-call allocation, pool start-up, lazy compilation
    best = float("inf")
    runs = 0
    start = time.perf_counter()
    while runs < min_runs or (time.perf_counter() - start < min_seconds and runs < max_runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def matmul_gflops(n: int = 2048, dtype=torch.float32) -> float:
    """This machine's fp32 matmul rate through torch (MKL/oneDNN), the ceiling the table's
    percentages refer to."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), min_runs=5, min_seconds=1.0) / 1e9
