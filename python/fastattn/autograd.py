"""``torch.autograd.Function`` drop-ins, one per op, for code written against the originals'
Function classes."""

from .attention import AttentionFunction
from .flow import FlowAttentionFunction
from .hilo import HiLoAttentionFunction
from .landmark import LandmarkAttentionFunction
from .linear import LinearAttentionFunction
from .neighborhood import NeighborhoodAttentionFunction

__all__ = ["AttentionFunction", "FlowAttentionFunction", "HiLoAttentionFunction", "LandmarkAttentionFunction", "LinearAttentionFunction", "NeighborhoodAttentionFunction"]
