"""Helpers shared by every family's torch front-end: dtype names, raw buffers, the
common input checks, and the CUDA slot for ops that have no CUDA kernel yet."""

from __future__ import annotations

import torch

from . import _checks


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def buf(t: torch.Tensor) -> tuple[int, int]:
    """``(address, numel)`` of a contiguous tensor, as the bindings take it."""
    return (t.data_ptr(), t.numel())


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and log-sum-exp) dtype for a storage dtype (SPEC §0)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensors(**named: torch.Tensor) -> None:
    """Every argument is a floating tensor of one supported dtype, all on one device."""
    first_name = first = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _checks.check_dtype(name, dtype_name(t.dtype))
        if first is None:
            first_name, first = name, t
            continue
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {dtype_name(t.dtype)} but {first_name} has "
                f"{dtype_name(first.dtype)}; they must match"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "they must be on one device"
            )


def no_cuda_kernel(op: str):
    """A CUDA implementation that says plainly there is none (rather than failing at import
    or silently copying to the CPU)."""

    def impl(*args, **kwargs):
        raise NotImplementedError(
            f"fastattn::{op} has no CUDA kernel in this build; move the inputs to the CPU "
            "or use the peer library on GPU"
        )

    return impl
