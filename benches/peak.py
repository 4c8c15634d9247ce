"""The table's FMA peak: the machine's, not the moment's.

One ``fastattn.measure_fma_peak`` call on a busy 2-core VM can land at half the real figure
(232, 229, 225, 117, 188, 232 GFLOP/s in six calls in a row here), and every row's ``% peak``
is then inflated with it. So the table measures several times, spread over the run (start,
between families, end), keeps the highest, and cross-checks it against threads × the
single-thread peak. A row that still comes out above 100% is a measurement error and is
printed as such, never as a share.

    .venv/bin/python benches/peak.py --threads 2    # the table's start-of-run peak step alone
"""

from __future__ import annotations

import argparse
from typing import Callable

# Measurements within this fraction of the highest count as agreeing with it.
AGREE = 0.05
# A multi-thread peak this far below threads × single-thread says the threads were not all
# running FMAs at full rate (a busy machine, or SMT siblings sharing one core's FMA units).
CROSS_CHECK = 0.9
# Start-of-run measurements on every thread, and extra tries when a row passes the peak.
START_MEASUREMENTS = 3
REMEASURE_TRIES = 3


class PeakTracker:
    """Measurements of the fp32 FMA peak in GFLOP/s; the figure is the highest of them."""

    def __init__(self, threads: int, measure: Callable[[int], float]):
        self.threads, self.measure = threads, measure
        self.values: list[float] = []
        self.single: float | None = None

    def add(self, value: float) -> float:
        if not value > 0:
            raise ValueError(f"a peak measurement must be positive, got {value!r}")
        self.values.append(float(value))
        return self.best

    def sample(self, times: int = 1) -> float:
        for _ in range(times):
            self.add(self.measure(self.threads))
        return self.best

    def sample_single(self) -> float:
        """The single-thread peak, for the cross-check (the highest of the calls made)."""
        v = float(self.measure(1))
        self.single = v if self.single is None else max(self.single, v)
        return self.single

    @property
    def best(self) -> float:
        if not self.values:
            raise ValueError("no peak measurement yet")
        return max(self.values)

    def agreeing(self, tol: float = AGREE) -> int:
        """How many measurements lie within ``tol`` of the highest."""
        return sum(v >= (1 - tol) * self.best for v in self.values)

    def share(self, gflops: float) -> float | None:
        """``gflops`` as a percentage of the peak, or None when it exceeds 100%: no kernel can
        pass the peak, so such a figure is a timing or FLOP-count error, not a share."""
        pct = 100.0 * gflops / self.best
        return None if pct > 100.0 else pct

    def settle(self, gflops: float, tries: int = REMEASURE_TRIES) -> float | None:
        """The share of ``gflops`` after re-measuring the peak (up to ``tries`` times) while
        it exceeds 100%; None if it still does."""
        for _ in range(tries):
            if self.share(gflops) is not None:
                break
            self.sample()
        return self.share(gflops)

    def describe(self) -> str:
        text = (f"{self.best:.1f} GFLOP/s, the highest of {len(self.values)} measurements on {self.threads} "
                f"thread{'s' * (self.threads != 1)} ({self.agreeing()} within {AGREE:.0%} of it)")
        if self.single is not None:
            expect = self.threads * self.single
            text += f"; {self.threads} x single-thread {self.single:.1f} = {expect:.1f}"
            if self.best < CROSS_CHECK * expect:
                text += (f" (measured {self.best / expect:.0%} of it: the threads share FMA units or "
                         "the machine was busy at every measurement)")
        return text

    def facts(self) -> dict:
        return {"peak_gflops": self.best, "peak_measurements": list(self.values),
                "peak_agreeing": self.agreeing(), "single_thread_peak_gflops": self.single}


def start_of_run(threads: int, measure: Callable[[int], float] | None = None) -> PeakTracker:
    """The table's start-of-run step: several measurements on every thread and one on one."""
    if measure is None:
        import fastattn

        measure = fastattn.measure_fma_peak
    peak = PeakTracker(threads, measure)
    peak.sample(START_MEASUREMENTS)
    peak.sample_single()
    return peak


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    peak = start_of_run(args.threads)
    print(f"{peak.best:.1f}  ({peak.describe()}; all: {', '.join(f'{v:.1f}' for v in peak.values)})")


if __name__ == "__main__":
    main()
