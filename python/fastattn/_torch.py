"""Helpers shared by every family's torch front-end: dtype names, raw buffers, the
common input checks, and the CUDA slot for ops that have no CUDA kernel yet."""

from __future__ import annotations

import torch

from . import _checks


_NAMES = {t: str(t).removeprefix("torch.") for t in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}
_C = torch._C


def dtype_name(dtype: torch.dtype) -> str:
    name = _NAMES.get(dtype)
    return str(dtype).removeprefix("torch.") if name is None else name


def buf(t: torch.Tensor) -> tuple[int, int]:
    """``(address, numel)`` of a contiguous tensor, as the bindings take it."""
    return (t.data_ptr(), t.numel())


NO_BUF = (0, 0)  # an absent optional input (the bindings read nothing from it)


def plain_eager() -> bool:
    """No compilation or tracing, no torch-function or dispatch mode, no functorch
    transform, no profiler: where a module may take an eager-only route (its own
    ``autograd.Function``, writes into buffers) that nothing could tell from the plain ops."""
    return not (
        torch.compiler.is_compiling()
        or _C._is_torch_function_mode_enabled()
        or _C._len_torch_dispatch_stack()
        or _C._are_functorch_transforms_active()
        or _C._autograd._profiler_enabled()
    )


def direct(*tensors) -> bool:
    """Whether an eager call may run its CPU kernel itself instead of going through the torch
    dispatcher: the custom op's autograd, redispatch and dynamo wrappers cost ~9 µs a call,
    most of a decode step's time. Only where nothing could tell the difference: no gradient
    to record, no compilation or tracing, no torch-function or dispatch mode (fake tensors,
    export, FlopCounterMode), no functorch transform, no profiler, and plain CPU tensors (no
    subclass). Every other call goes through ``torch.ops.fastattn``, with the same kernel."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return False
    if not plain_eager():
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or not t.is_cpu):
            return False
    return True


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and log-sum-exp) dtype for a storage dtype (docs/conventions.md)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensors(**named: torch.Tensor) -> None:
    """Every argument is a floating tensor of one supported dtype, all on one device."""
    first_name = first = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} has layout {t.layout}; fastattn takes dense (strided) tensors")
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
