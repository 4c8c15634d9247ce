"""The compiled extension and the runtime settings every kernel call carries.

Kernels run on a rayon pool sized, per call, like torch's intra-op pool
(``torch.get_num_threads()``) unless ``FASTATTN_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import os

from . import _fastattn as lib

__all__ = ["lib", "num_threads", "simd_level", "simd_levels", "set_simd_level", "release_memory",
           "measure_fma_peak"]


def num_threads() -> int:
    """Threads the next kernel call will use."""
    env = os.environ.get("FASTATTN_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"FASTATTN_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"FASTATTN_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:  # pragma: no cover - torch is a dependency, but numpy users may lack it
        return max(1, os.cpu_count() or 1)


def simd_level() -> str:
    """The SIMD level kernels dispatch to now: 'scalar', 'avx2', 'avx512' or 'neon'."""
    return lib.simd_level()


def simd_levels() -> list[str]:
    """Every SIMD level this CPU can run, lowest first."""
    return list(lib.simd_levels())


def set_simd_level(level: str | None = None) -> str:
    """Caps kernel dispatch at ``level`` (None: the best available). Also settable with the
    ``FASTATTN_SIMD`` environment variable before the first kernel call."""
    if level is not None and not isinstance(level, str):
        raise TypeError(f"level must be a str or None, got {type(level).__name__}")
    return lib.set_simd_level(level)


def release_memory() -> None:
    """Frees the scratch buffers kernels keep between calls to avoid page faults on the next
    call (at most 256 MiB per element type)."""
    lib.release_buffers()


def measure_fma_peak(threads: int | None = None, seconds: float = 0.5) -> float:
    """This machine's fp32 FMA peak in GFLOP/s, measured now at the active SIMD level on
    ``threads`` threads (default: :func:`num_threads`) for about ``seconds``: the hardware
    limit the benchmark table's ``% peak`` refers to. Each thread runs independent vector
    FMA chains (more than FMA latency × FMA ports) from distinct unknown starting values,
    best of 5 rounds; the scalar level measures separate multiplies and adds."""
    if threads is None:
        threads = num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 60:
        raise ValueError(f"seconds must be a number in (0, 60], got {seconds!r}")
    return lib.measure_fma_peak(threads, float(seconds))[0]
