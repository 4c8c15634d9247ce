"""Plain PyTorch oracles of every fastattn op, written from the math of the project's ``docs/`` for
clarity, not speed. They work in the inputs' dtype (so float64 is exact enough to check the
kernels) and are differentiable with autograd."""

from .dense import attention
from .flow import FlowAttention, FlowAttentionCausal, flow_attention
from .hilo import HiLo
from .landmark import landmark_attention, landmark_retrieval_attention
from .linear import linear_attention
from .neighborhood import na1d, na2d, na3d, na_window, neighborhood_attention, neighborhood_mask

__all__ = [
    "attention",
    "flow_attention",
    "FlowAttention",
    "FlowAttentionCausal",
    "HiLo",
    "landmark_attention",
    "landmark_retrieval_attention",
    "linear_attention",
    "na1d",
    "na2d",
    "na3d",
    "na_window",
    "neighborhood_attention",
    "neighborhood_mask",
]
