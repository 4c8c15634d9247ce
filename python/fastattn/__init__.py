"""fastattn: efficient attention ops with Rust SIMD CPU kernels.

Families: dense flash-style attention (:func:`attention`), plus the plain PyTorch oracles of
every op in :mod:`fastattn.reference`. Kernels run on ``torch.get_num_threads()`` threads (or
``FASTATTN_NUM_THREADS``); :func:`set_simd_level` caps runtime SIMD dispatch.
"""

from . import autograd, numpy, reference
from ._native import num_threads, set_simd_level, simd_level, simd_levels
from .attention import AttentionFunction, attention

__version__ = "0.1.0"

__all__ = [
    "attention",
    "AttentionFunction",
    "autograd",
    "numpy",
    "reference",
    "num_threads",
    "set_simd_level",
    "simd_level",
    "simd_levels",
]
