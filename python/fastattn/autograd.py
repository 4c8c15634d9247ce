"""``torch.autograd.Function`` drop-ins, one per op, for code written against the originals'
Function classes."""

from .attention import AttentionFunction

__all__ = ["AttentionFunction"]
