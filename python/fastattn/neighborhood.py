"""Neighborhood attention with NATTEN 0.21 semantics (docs/neighborhood.md), 1-D to 3-D.

``na1d`` / ``na2d`` / ``na3d`` / ``neighborhood_attention(query, key, value, kernel_size,
stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
additional_values=None, return_lse=False)`` on heads-last ``[B, *spatial, H, D]`` tensors,
with per-dimension window arguments, GQA (``H % H_kv == 0``), ``Dv != D`` and additional
keys/values ``[B, n, H_kv, D]`` that every query attends to without a mask.

Torch ops: ``fastattn::na_fwd`` → ``(out, lse)`` and ``fastattn::na_bwd`` → ``(dq, dk, dv,
d_additional_keys, d_additional_values)``; autograd is registered on the forward op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks
from ._native import lib, num_threads
from ._torch import NO_BUF, acc_dtype, buf, check_tensors, direct, dtype_name, no_cuda_kernel

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "NeighborhoodAttentionFunction"]


def _extra(t: Optional[Tensor], like: Tensor, head_dim: int) -> Tensor:
    """The additional keys/values as the kernel takes them: contiguous, or an empty
    ``[B, 0, H_kv, head_dim]`` tensor when there are none."""
    if t is None:
        return like.new_empty((like.shape[0], 0, like.shape[-2], head_dim))
    return t.contiguous()


def _params(kernel_size, stride, dilation, is_causal, scale):
    return (list(kernel_size), list(stride), list(dilation), list(is_causal), float(scale))


def _forward_cpu(q, k, v, ak, av, dims, window) -> tuple[Tensor, Tensor]:
    """The CPU kernel on validated inputs (``dims`` from :func:`_checks.na_dims`)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    ak = NO_BUF if ak is None else buf(ak.contiguous())
    av = NO_BUF if av is None else buf(av.contiguous())
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))
    lib.na_forward(dtype_name(q.dtype), dims, window, num_threads(),
                   buf(q), buf(k), buf(v), ak, av, buf(out), buf(lse))
    return out, lse


@torch.library.custom_op("fastattn::na_fwd", mutates_args=(), device_types="cpu")
def na_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    additional_keys: Optional[Tensor],
    additional_values: Optional[Tensor],
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
) -> tuple[Tensor, Tensor]:
    ak, av = additional_keys, additional_values
    dims = _checks.na_dims(q.shape, k.shape, v.shape, None if ak is None else ak.shape,
                           None if av is None else av.shape)
    return _forward_cpu(q, k, v, ak, av, dims, (kernel_size, stride, dilation, is_causal, scale))


@na_fwd.register_fake
def _(q, k, v, additional_keys, additional_values, kernel_size, stride, dilation, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))


na_fwd.register_kernel("cuda")(no_cuda_kernel("na_fwd"))


@torch.library.custom_op("fastattn::na_bwd", mutates_args=(), device_types="cpu")
def na_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    additional_keys: Optional[Tensor],
    additional_values: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, out, lse = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous()
    dout = dout.to(q.dtype).contiguous()
    ak, av = _extra(additional_keys, k, k.shape[-1]), _extra(additional_values, v, v.shape[-1])
    dims = _checks.na_dims(q.shape, k.shape, v.shape, ak.shape, av.shape)
    grads = tuple(torch.empty_like(t) for t in (q, k, v, ak, av))
    lib.na_backward(
        dtype_name(q.dtype), dims, _params(kernel_size, stride, dilation, is_causal, scale), num_threads(),
        buf(q), buf(k), buf(v), buf(ak), buf(av), buf(out), buf(dout), buf(lse),
        tuple(buf(g) for g in grads),
    )
    return grads


@na_bwd.register_fake
def _(dout, q, k, v, additional_keys, additional_values, out, lse, kernel_size, stride, dilation, is_causal, scale):
    ak, av = _extra(additional_keys, k, k.shape[-1]), _extra(additional_values, v, v.shape[-1])
    return tuple(torch.empty_like(t) for t in (q, k, v, ak, av))


na_bwd.register_kernel("cuda")(no_cuda_kernel("na_bwd"))


def _setup_context(ctx, inputs, output):
    q, k, v, ak, av, *window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, ak, av, out, lse)
    ctx.window = window
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, ak, av, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dak, dav = torch.ops.fastattn.na_bwd(dout, q, k, v, ak, av, out, lse, *ctx.window)
    if ak is None:
        dak = dav = None
    return (dq, dk, dv, dak, dav) + (None,) * len(ctx.window)


na_fwd.register_autograd(_backward, setup_context=_setup_context)


def _prepare(query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
             additional_values, rank=None):
    """Validates everything in Python (naming the argument) and returns the kernel's dims and
    the op's window arguments ``(kernel_size, stride, dilation, is_causal, scale)`` as lists
    and a float."""
    named = _checks.na_inputs(query, key, value, additional_keys, additional_values)
    check_tensors(**named)
    return _checks.na_call(named, kernel_size, stride, dilation, is_causal, scale, rank)


def neighborhood_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: float | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    return_lse: bool = False,
    *,
    _rank: int | None = None,
):
    """Neighborhood attention, NATTEN's ``na{1,2,3}d`` with the rank taken from the input.

    Args:
        query: ``[B, *spatial, H, D]`` with 1-3 spatial dims.
        key: ``[B, *spatial, H_kv, D]``, ``H % H_kv == 0`` (GQA/MQA).
        value: ``[B, *spatial, H_kv, Dv]``.
        kernel_size, stride, dilation: an int, or one per spatial dim (docs/neighborhood.md:
            ``kernel_size >= 2``, ``1 <= stride <= kernel_size``, ``kernel_size * dilation``
            at most the input size).
        is_causal: a bool, or one per spatial dim.
        scale: score scale, default ``D ** -0.5``.
        additional_keys, additional_values: ``[B, n, H_kv, D]`` / ``[B, n, H_kv, Dv]``,
            attended by every query without a mask; the softmax runs over the union.
        return_lse: also return the log-sum-exp ``[B, *spatial, H]`` (float32; float64 for
            float64 inputs), non-differentiable.

    float32/float64/bfloat16/float16 (one dtype for all); half types accumulate in float32.
    Differentiable in query, key, value and the additional keys/values.
    """
    dims, window = _prepare(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                            additional_keys, additional_values, _rank)
    _checks.check_bool("return_lse", return_lse)
    if direct(query, key, value, additional_keys, additional_values):
        out, lse = _forward_cpu(query, key, value, additional_keys, additional_values, dims, window)
    else:
        out, lse = torch.ops.fastattn.na_fwd(query, key, value, additional_keys, additional_values, *window)
    return (out, lse) if return_lse else out


def _ranked(rank: int):
    def fn(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
           additional_keys=None, additional_values=None, return_lse=False):
        return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                                      additional_keys, additional_values, return_lse, _rank=rank)

    fn.__name__ = fn.__qualname__ = f"na{rank}d"
    fn.__doc__ = (
        f"{rank}-D neighborhood attention on ``[B, {', '.join('XYZ'[:rank])}, H, D]`` tensors; "
        "see :func:`neighborhood_attention`."
    )
    return fn


na1d = _ranked(1)
na2d = _ranked(2)
na3d = _ranked(3)


class NeighborhoodAttentionFunction(torch.autograd.Function):
    """``torch.autograd.Function`` drop-in: ``NeighborhoodAttentionFunction.apply(query, key,
    value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
    additional_keys=None, additional_values=None)`` → ``out``; forward and backward call the
    ``fastattn::na_*`` ops."""

    @staticmethod
    def forward(ctx, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                additional_keys=None, additional_values=None):
        _, window = _prepare(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                             additional_keys, additional_values)
        out, lse = torch.ops.fastattn.na_fwd(query, key, value, additional_keys, additional_values, *window)
        ctx.save_for_backward(query, key, value, additional_keys, additional_values, out, lse)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, ak, av, out, lse = ctx.saved_tensors
        dq, dk, dv, dak, dav = torch.ops.fastattn.na_bwd(dout, q, k, v, ak, av, out, lse, *ctx.window)
        if ak is None:
            dak = dav = None
        return dq, dk, dv, None, None, None, None, None, dak, dav
