"""Plain PyTorch oracles of every fastattn op, written from ``shared/SPEC.md``'s math for
clarity, not speed. They work in the inputs' dtype (so float64 is exact enough to check the
kernels) and are differentiable with autograd."""

from .dense import attention

__all__ = ["attention"]
