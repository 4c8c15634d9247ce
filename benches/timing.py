"""Wall-clock timing for the table: warm up, then the best of several calls (three for slow
calls, one for calls over a second), fastattn and a peer in alternating rounds
so that both sides of a ratio see the same machine, and a progress line for terminals."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

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


# Interleaved rounds: each side runs about SLICE seconds of calls per round, and rounds go on
# until the longest side has run MIN_SECONDS in all (at least MIN_ROUNDS, at most MAX_ROUNDS).
SLICE = 0.03
MIN_ROUNDS, MAX_ROUNDS = 3, 10
MIN_SECONDS = 0.3
# A pair with a side slower than ``slow`` runs SLOW_ROUNDS rounds of one call for that side:
# its figure is the best of three calls. A single call is not a stable figure on these VMs:
# the HiLo paper layer's forward (about 150 ms best) once took 374 ms on its one call, and
# page faults on fresh 38 MB buffers alone move a call by 10-20 ms. Sides slower than
# ``once_above`` (ONCE_ABOVE seconds) keep their first call, to bound the run's length.
SLOW_ROUNDS = 2
ONCE_ABOVE = 1.0
MAX_CALLS = 10_000
# The rounds of a pair disagree when their per-round ratios spread by more than this.
DISAGREE = 0.15


@dataclass
class SideTiming:
    """One side of an interleaved timing: its best call, and how it was reached."""

    best: float
    once: bool = False  # slower than ``once_above``: one call after the warm-up, not in the rounds
    calls_per_round: int = 0
    round_bests: list[float] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.round_bests)


class SideFailed(Exception):
    """A side raised: ``name`` says which, so a peer's failure is not taken for ours."""

    def __init__(self, name: str, error: BaseException):
        super().__init__(f"{name}: {type(error).__name__}: {error}")
        self.name, self.error = name, error


def interleaved(fns: dict[str, Callable[[], object]], slow: float = 0.2, repeat_slow: bool = False,
                slice_s: float | None = None, min_rounds: int | None = None, max_rounds: int | None = None,
                min_seconds: float | None = None, once_above: float | None = None) -> dict[str, SideTiming]:
    """Times several callables in alternating rounds (A…A B…B A…A B…B …): every side is warmed
    up and timed once, then each round runs every side for about ``slice_s`` seconds of calls,
    in turn, the same number of rounds for all; a side's figure is its fastest call. A noisy
    spell then lands on both sides of a ratio instead of on one. Unless ``repeat_slow``: when
    a side's first timed call takes longer than ``slow``, every side runs SLOW_ROUNDS rounds
    and that side one call per round; a side whose first call takes longer than
    ``once_above`` keeps that one call and sits the rounds out."""
    once_above = ONCE_ABOVE if once_above is None else once_above
    slice_s = SLICE if slice_s is None else slice_s
    min_rounds = MIN_ROUNDS if min_rounds is None else min_rounds
    max_rounds = MAX_ROUNDS if max_rounds is None else max_rounds
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    first = {}
    for name, fn in fns.items():
        try:
            _timed(fn)  # warm-up: allocation, pool start-up, compilation, a saved graph
            first[name] = _timed(fn)
        except Exception as e:  # noqa: BLE001
            raise SideFailed(name, e) from e
    out = {name: SideTiming(t, once=not repeat_slow and t > once_above) for name, t in first.items()}
    live = {n: fns[n] for n in fns if not out[n].once}
    if not live:
        return out
    for name in live:
        out[name].calls_per_round = min(MAX_CALLS, max(1, round(slice_s / max(first[name], 1e-9))))
    longest = max(out[n].calls_per_round * first[n] for n in live)
    rounds = max(min_rounds, min(max_rounds, -(-min_seconds // max(longest, 1e-9))))
    if not repeat_slow and any(first[n] > slow for n in live):
        rounds = SLOW_ROUNDS
        for name in live:
            if first[name] > slow:
                out[name].calls_per_round = 1
    for _ in range(int(rounds)):
        for name, fn in live.items():
            side = out[name]
            try:
                best = min(_timed(fn) for _ in range(side.calls_per_round))
            except Exception as e:  # noqa: BLE001
                raise SideFailed(name, e) from e
            side.round_bests.append(best)
            side.best = min(side.best, best)
    return out


def disagreement(ours: SideTiming, peer: SideTiming) -> float | None:
    """How far a pair's ratio moves between the first and the second half of its rounds
    (each half's best on each side; max / min − 1), or None without two rounds on both
    sides. Single rounds are too short to compare one by one: on a 2-core VM a 30 ms slice
    moves 10–20% by itself while the halves' ratios agree within a few percent."""
    n = min(len(ours.round_bests), len(peer.round_bests))
    if n < 2:
        return None
    h = (n + 1) // 2
    ratios = [min(peer.round_bests[s]) / min(ours.round_bests[s]) for s in (slice(0, h), slice(h, n))]
    return max(ratios) / min(ratios) - 1.0


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
