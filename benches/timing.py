"""Wall-clock timing for the table: warm up, then the best of several calls (or one call,
for calls slow enough that one is a stable figure), and a progress line for terminals."""

from __future__ import annotations

import sys
import time

import torch


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call(fn, repeat_slow: bool = True, slow: float = 0.2, min_runs: int = 3,
              min_seconds: float = 0.3, max_runs: int = 50) -> float:
    """Seconds of one call of ``fn`` after a warm-up call (first-call allocation, pool
    start-up, lazy compilation, a backward's saved graph): the fastest of at least
    ``min_runs`` calls and about ``min_seconds``, or, unless ``repeat_slow``, the first call
    after the warm-up alone when it took longer than ``slow`` seconds."""
    warm = _timed(fn)
    first = _timed(fn)
    del warm
    if not repeat_slow and first > slow:
        return first
    best, runs = first, 1
    start = time.perf_counter()
    while runs < min_runs or (time.perf_counter() - start < min_seconds and runs < max_runs):
        best = min(best, _timed(fn))
        runs += 1
    return best


def best_time(fn, min_runs: int = 3, min_seconds: float = 0.3, max_runs: int = 50) -> float:
    """Best of several calls after a warm-up, whatever their length."""
    return time_call(fn, True, min_runs=min_runs, min_seconds=min_seconds, max_runs=max_runs)


def matmul_gflops(n: int = 2048, dtype=torch.float32) -> float:
    """This machine's fp32 matmul rate through torch (MKL/oneDNN), the ``% mm`` reference."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), min_runs=5, min_seconds=1.0) / 1e9


class Progress:
    """One line saying what is being timed, redrawn in place on a terminal; silent when the
    output is piped or redirected."""

    def __init__(self, enabled: bool, stream=sys.stdout):
        self.enabled, self.stream, self.shown = enabled, stream, False

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"\r\x1b[K  timing {text} ...")
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
