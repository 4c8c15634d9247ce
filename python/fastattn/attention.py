"""Dense softmax attention (flash-style), the building block of the other families.

``attention(q, k, v, is_causal=False, scale=None, return_lse=False)`` with heads-last layout
``[B, T, H, D]``. Causal masking aligns the queries to the *end* of the keys, as flash-attn
does (query ``i`` sees key ``j`` iff ``j <= i + Tk - Tq``); note this differs from
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` when ``Tq != Tk``. A
query that sees no key gets output 0 and log-sum-exp ``-inf``. NaN inputs propagate.

Torch ops: ``fastattn::attention_fwd`` → ``(out, lse)`` and ``fastattn::attention_bwd`` →
``(dq, dk, dv)``; autograd is registered on the forward op (``lse`` is returned as
non-differentiable; double backward is not supported).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._native import lib, num_threads
from ._torch import acc_dtype, buf, check_tensors, direct, dtype_name, no_cuda_kernel

__all__ = ["attention", "AttentionFunction"]


@torch.library.custom_op("fastattn::attention_fwd", mutates_args=(), device_types="cpu")
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool) -> tuple[Tensor, Tensor]:
    return _forward_cpu(q, k, v, scale, is_causal, _checks.attention_dims(q.shape, k.shape, v.shape))


def _forward_cpu(q, k, v, scale, is_causal, dims) -> tuple[Tensor, Tensor]:
    """The CPU kernel on validated inputs (``dims`` from :func:`_checks.attention_dims`)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, tq, _, hq, _, _, dv = dims
    out = q.new_empty((b, tq, hq, dv))
    lse = q.new_empty((b, tq, hq), dtype=acc_dtype(q.dtype))
    lib.attention_forward(
        dtype_name(q.dtype), dims, scale, is_causal, num_threads(),
        buf(q), buf(k), buf(v), buf(out), buf(lse),
    )
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, scale, is_causal):
    b, tq, hq, _ = q.shape
    return q.new_empty((b, tq, hq, v.shape[-1])), q.new_empty((b, tq, hq), dtype=acc_dtype(q.dtype))


attention_fwd.register_kernel("cuda")(no_cuda_kernel("attention_fwd"))


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=(), device_types="cpu")
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, is_causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, lse = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous()
    dout = dout.to(q.dtype).contiguous()
    dims = _checks.attention_dims(q.shape, k.shape, v.shape)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lib.attention_backward(
        dtype_name(q.dtype), dims, scale, is_causal, num_threads(),
        buf(q), buf(k), buf(v), buf(out), buf(dout), buf(lse), buf(dq), buf(dk), buf(dv),
    )
    return dq, dk, dv


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, is_causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


attention_bwd.register_kernel("cuda")(no_cuda_kernel("attention_bwd"))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, is_causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.is_causal = scale, is_causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fastattn.attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.is_causal)
    return dq, dk, dv, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _prepare(q, k, v, is_causal, scale):
    """Validates the call; returns ``(scale, dims)``."""
    check_tensors(q=q, k=k, v=v)
    _checks.check_bool("is_causal", is_causal)
    dims = _checks.attention_dims(q.shape, k.shape, v.shape)
    return _checks.check_scale(scale, q.shape[-1] ** -0.5 if q.shape[-1] else 1.0), dims


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Softmax attention ``softmax(scale · q kᵀ) v`` over heads-last tensors.

    Args:
        q: ``[B, Tq, Hq, D]``.
        k: ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
        v: ``[B, Tk, Hkv, Dv]``.
        is_causal: mask keys after each query, bottom-right aligned (flash-attn).
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``[B, Tq, Hq]`` (float32; float64 for
            float64 inputs), non-differentiable.

    float32/float64/bfloat16/float16 (one dtype for all three); half types accumulate in
    float32. Non-contiguous inputs are copied. Differentiable in q, k, v.
    """
    scale, dims = _prepare(q, k, v, is_causal, scale)
    _checks.check_bool("return_lse", return_lse)
    if direct(q, k, v):
        out, lse = _forward_cpu(q, k, v, scale, is_causal, dims)
    else:
        out, lse = torch.ops.fastattn.attention_fwd(q, k, v, scale, is_causal)
    return (out, lse) if return_lse else out


class AttentionFunction(torch.autograd.Function):
    """``torch.autograd.Function`` drop-in: ``AttentionFunction.apply(q, k, v, is_causal=False,
    scale=None)`` → ``out``; forward and backward call the ``fastattn::attention_*`` ops."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal=False, scale=None):
        scale, _ = _prepare(q, k, v, is_causal, scale)
        out, lse = torch.ops.fastattn.attention_fwd(q, k, v, scale, is_causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.is_causal = scale, is_causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastattn.attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.is_causal)
        return dq, dk, dv, None, None
