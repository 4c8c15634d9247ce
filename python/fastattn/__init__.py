"""fastattn: efficient attention ops with Rust SIMD CPU kernels.

Families: dense flash-style attention (:func:`attention`), neighborhood attention
(:func:`na1d` / :func:`na2d` / :func:`na3d`), HiLo attention (:func:`hilo_attention`,
:class:`fastattn.nn.HiLo`), landmark attention (:func:`landmark_attention`), linear and flow
attention, plus the plain PyTorch oracles of
every op in :mod:`fastattn.reference`. Kernels run on ``torch.get_num_threads()`` threads (or
``FASTATTN_NUM_THREADS``); :func:`set_simd_level` caps runtime SIMD dispatch.
"""

from . import autograd, numpy, reference
from ._native import measure_fma_peak, num_threads, release_memory, set_simd_level, simd_level, simd_levels
from .attention import AttentionFunction, attention
from .flow import FlowAttentionFunction, flow_attention
from .hilo import HiLoAttentionFunction, hilo_attention
from .landmark import LandmarkAttentionFunction, landmark_attention, landmark_retrieval_attention
from .linear import LinearAttentionFunction, linear_attention
from .neighborhood import NeighborhoodAttentionFunction, na1d, na2d, na3d, neighborhood_attention
from . import nn  # noqa: E402  (after the ops it wraps)

__version__ = "0.1.0"

__all__ = [
    "attention",
    "AttentionFunction",
    "flow_attention",
    "FlowAttentionFunction",
    "hilo_attention",
    "HiLoAttentionFunction",
    "landmark_attention",
    "LandmarkAttentionFunction",
    "landmark_retrieval_attention",
    "linear_attention",
    "LinearAttentionFunction",
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "NeighborhoodAttentionFunction",
    "nn",
    "autograd",
    "numpy",
    "reference",
    "measure_fma_peak",
    "num_threads",
    "release_memory",
    "set_simd_level",
    "simd_level",
    "simd_levels",
]
