"""HiLo attention (LITv2, docs/hilo.md) at the attention boundary: the projections' outputs
in, the two branches' outputs before their output projections out.

``hilo_attention(hi_qkv, lo_q, lo_kv, window_size, head_dim, scale=None, hi_pad_kv=None,
return_lse=False)`` takes the tensors LITv2's Linear layers produce, channels last and
channel-interleaved as they come out of them (``hi_qkv`` ``[B, H, W, 3·h_dim]`` laid out
``[q | k | v]`` × heads × head_dim, ``lo_q`` ``[B, H, W, l_dim]``, ``lo_kv`` ``[B, ceil(H/ws),
ceil(W/ws), 2·l_dim]`` laid out ``[k | v]``); the window partition, head split and padding are
done inside the kernels, so no permute or copy runs between the projections and attention.
Hi-Fi windows that reach past the bottom/right edge of a map whose sides are not multiples
of ``ws`` see the pad token's key/value ``hi_pad_kv`` (the Hi-Fi projection of a zero token:
its bias's k and v parts; zeros when None) for their missing tokens, as LITv2's padded form
does; outputs cover the map itself (LITv2 crops the pad tokens after the projections).

Torch ops: ``fastattn::hilo_fwd`` → ``(hi_out, lo_out, lo_lse)`` and ``fastattn::hilo_bwd`` →
``(d_hi_qkv, d_hi_pad_kv, d_lo_q, d_lo_kv)``; an absent branch has zero-channel outputs (and
zero-size gradients). The Hi-Fi backward recomputes its window softmax; the Lo-Fi backward
uses the saved output and log-sum-exp. Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks
from ._native import lib, num_threads
from ._torch import NO_BUF, acc_dtype, buf, check_tensors, direct, dtype_name, no_cuda_kernel

__all__ = ["hilo_attention", "HiLoAttentionFunction"]


def _shape(t):
    return None if t is None else tuple(t.shape)


def _dims(hi_qkv, hi_pad_kv, lo_q, lo_kv, window_size, head_dim):
    return _checks.hilo_dims(_shape(hi_qkv), _shape(lo_q), _shape(lo_kv), _shape(hi_pad_kv), window_size, head_dim)


def _contig(t):
    return None if t is None else t.contiguous()


def _b(t):
    return NO_BUF if t is None else buf(t)


def _empty_outputs(like: Tensor, dims):
    b, h, w, _, hd, nh, nl = dims
    return (
        like.new_empty((b, h, w, nh * hd)),
        like.new_empty((b, h, w, nl * hd)),
        like.new_empty((b, h * w, nl), dtype=acc_dtype(like.dtype)),
    )


@torch.library.custom_op("fastattn::hilo_fwd", mutates_args=(), device_types="cpu")
def hilo_fwd(
    hi_qkv: Optional[Tensor], hi_pad_kv: Optional[Tensor], lo_q: Optional[Tensor], lo_kv: Optional[Tensor],
    window_size: int, head_dim: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dims = _dims(hi_qkv, hi_pad_kv, lo_q, lo_kv, window_size, head_dim)
    return _forward_cpu(hi_qkv, hi_pad_kv, lo_q, lo_kv, scale, dims)


def _forward_cpu(hi_qkv, hi_pad_kv, lo_q, lo_kv, scale, dims):
    """The CPU kernel on validated inputs (``dims`` from :func:`_checks.hilo_dims`)."""
    hi_qkv, hi_pad_kv, lo_q, lo_kv = map(_contig, (hi_qkv, hi_pad_kv, lo_q, lo_kv))
    like = hi_qkv if hi_qkv is not None else lo_q
    hi_out, lo_out, lse = _empty_outputs(like, dims)
    if like.numel():
        lib.hilo_forward(
            dtype_name(like.dtype), dims, scale, num_threads(),
            _b(hi_qkv), None if hi_pad_kv is None else buf(hi_pad_kv), _b(lo_q), _b(lo_kv),
            buf(hi_out), buf(lo_out), buf(lse),
        )
    return hi_out, lo_out, lse


@hilo_fwd.register_fake
def _(hi_qkv, hi_pad_kv, lo_q, lo_kv, window_size, head_dim, scale):
    dims = _dims(hi_qkv, hi_pad_kv, lo_q, lo_kv, window_size, head_dim)
    return _empty_outputs(hi_qkv if hi_qkv is not None else lo_q, dims)


hilo_fwd.register_kernel("cuda")(no_cuda_kernel("hilo_fwd"))


def _grad_like(t, like):
    return like.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastattn::hilo_bwd", mutates_args=(), device_types="cpu")
def hilo_bwd(
    d_hi_out: Tensor, d_lo_out: Tensor,
    hi_qkv: Optional[Tensor], hi_pad_kv: Optional[Tensor], lo_q: Optional[Tensor], lo_kv: Optional[Tensor],
    lo_out: Tensor, lo_lse: Tensor, window_size: int, head_dim: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dims = _dims(hi_qkv, hi_pad_kv, lo_q, lo_kv, window_size, head_dim)
    hi_qkv, hi_pad_kv, lo_q, lo_kv = map(_contig, (hi_qkv, hi_pad_kv, lo_q, lo_kv))
    like = hi_qkv if hi_qkv is not None else lo_q
    d_hi_out = d_hi_out.to(like.dtype).contiguous()
    d_lo_out = d_lo_out.to(like.dtype).contiguous()
    lo_out, lo_lse = lo_out.contiguous(), lo_lse.contiguous()
    grads = [_grad_like(t, like) for t in (hi_qkv, hi_pad_kv, lo_q, lo_kv)]
    if like.numel():
        lib.hilo_backward(
            dtype_name(like.dtype), dims, scale, num_threads(),
            _b(hi_qkv), None if hi_pad_kv is None else buf(hi_pad_kv), _b(lo_q), _b(lo_kv),
            buf(lo_out), buf(lo_lse), buf(d_hi_out), buf(d_lo_out), *map(buf, grads),
        )
    else:
        for g in grads:
            g.zero_()
    return tuple(grads)


@hilo_bwd.register_fake
def _(d_hi_out, d_lo_out, hi_qkv, hi_pad_kv, lo_q, lo_kv, lo_out, lo_lse, window_size, head_dim, scale):
    like = hi_qkv if hi_qkv is not None else lo_q
    return tuple(_grad_like(t, like) for t in (hi_qkv, hi_pad_kv, lo_q, lo_kv))


hilo_bwd.register_kernel("cuda")(no_cuda_kernel("hilo_bwd"))


def _save(ctx, inputs, output):
    hi_qkv, hi_pad_kv, lo_q, lo_kv, window_size, head_dim, scale = inputs
    hi_out, lo_out, lse = output
    ctx.save_for_backward(hi_qkv, hi_pad_kv, lo_q, lo_kv, lo_out, lse)
    ctx.args = (window_size, head_dim, scale)
    ctx.present = tuple(t is not None for t in (hi_qkv, hi_pad_kv, lo_q, lo_kv))
    ctx.hi_shape = tuple(hi_out.shape)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output)
    ctx.mark_non_differentiable(output[2])


def _run_backward(ctx, d_hi_out, d_lo_out):
    hi_qkv, hi_pad_kv, lo_q, lo_kv, lo_out, lse = ctx.saved_tensors
    if d_hi_out is None:
        d_hi_out = lo_out.new_zeros(ctx.hi_shape)
    if d_lo_out is None:
        d_lo_out = torch.zeros_like(lo_out)
    grads = torch.ops.fastattn.hilo_bwd(d_hi_out, d_lo_out, hi_qkv, hi_pad_kv, lo_q, lo_kv, lo_out, lse, *ctx.args)
    return tuple(g if present else None for g, present in zip(grads, ctx.present))


def _backward(ctx, d_hi_out, d_lo_out, _d_lse):
    return (*_run_backward(ctx, d_hi_out, d_lo_out), None, None, None)


hilo_fwd.register_autograd(_backward, setup_context=_setup_context)


def _prepare(hi_qkv, lo_q, lo_kv, window_size, head_dim, scale, hi_pad_kv):
    """Validates the call; returns ``(scale, dims)``."""
    named = {k: t for k, t in (("hi_qkv", hi_qkv), ("lo_q", lo_q), ("lo_kv", lo_kv), ("hi_pad_kv", hi_pad_kv))
             if t is not None}
    check_tensors(**named)
    dims = _dims(hi_qkv, hi_pad_kv, lo_q, lo_kv, window_size, head_dim)
    return _checks.check_scale(scale, head_dim ** -0.5), dims


def hilo_attention(
    hi_qkv: Tensor | None,
    lo_q: Tensor | None,
    lo_kv: Tensor | None,
    window_size: int,
    head_dim: int,
    scale: float | None = None,
    hi_pad_kv: Tensor | None = None,
    return_lse: bool = False,
):
    """HiLo attention on the projections' outputs (docs/hilo.md).

    Args:
        hi_qkv: Hi-Fi ``[q | k | v]`` projection output ``[B, H, W, 3·h_dim]`` (LITv2's
            ``h_qkv(x)``), or None for a layer without Hi-Fi heads.
        lo_q: Lo-Fi queries ``[B, H, W, l_dim]`` (``l_q(x)``), or None with ``lo_kv``.
        lo_kv: pooled ``[k | v]`` ``[B, ceil(H/ws), ceil(W/ws), 2·l_dim]`` (``l_kv`` of the
            ``ws × ws`` average-pooled, zero-padded map).
        window_size: ``ws``, 1..8.
        head_dim: channels per head, shared by both branches.
        scale: score scale, default ``head_dim ** -0.5``.
        hi_pad_kv: ``[2·h_dim]`` key/value of the pad tokens that fill Hi-Fi windows past
            the map's bottom/right edge (None: zeros).
        return_lse: also return the Lo-Fi log-sum-exp ``[B, H·W, l_heads]`` (float32;
            float64 for float64 inputs), non-differentiable.

    Returns ``(hi_out [B, H, W, h_dim], lo_out [B, H, W, l_dim])``, None for an absent
    branch (``(..., lse)`` with ``return_lse``). float32/float64/bfloat16/float16 (one dtype
    for all inputs; half types accumulate in float32). Differentiable in every input.
    """
    scale, dims = _prepare(hi_qkv, lo_q, lo_kv, window_size, head_dim, scale, hi_pad_kv)
    _checks.check_bool("return_lse", return_lse)
    args = (hi_qkv, hi_pad_kv, lo_q, lo_kv)
    if direct(*args):
        hi, lo, lse = _forward_cpu(*args, scale, dims)
    else:
        hi, lo, lse = torch.ops.fastattn.hilo_fwd(*args, window_size, head_dim, scale)
    hi = hi if hi_qkv is not None else None
    lo, lse = (lo, lse) if lo_q is not None else (None, None)
    return (hi, lo, lse) if return_lse else (hi, lo)


def _attention_over_inputs(hi_qkv, lo_q, lo_kv, window_size, head_dim, scale, hi_pad_kv=None):
    """``hilo_attention`` for ``nn.HiLo``'s inference calls, writing each branch's output over
    its queries: the Hi-Fi output into the q channels of ``hi_qkv`` (returned as the view
    ``hi_qkv[..., :h_dim]``), the Lo-Fi output into ``lo_q``. Same numbers as
    ``hilo_attention``; the caller owns both inputs, needs no gradient and never reads them
    again. It saves the fresh output buffers (38 MiB at the LITv2 paper's layer) whose first
    touch costs page faults on every call. Returns None, having done nothing, where the
    plain call must run instead (gradients, compilation, modes, non-contiguous or
    non-CPU tensors)."""
    args = (hi_qkv, hi_pad_kv, lo_q, lo_kv)
    if not direct(*args) or any(t is not None and not t.is_contiguous() for t in args):
        return None
    scale, dims = _prepare(hi_qkv, lo_q, lo_kv, window_size, head_dim, scale, hi_pad_kv)
    like = hi_qkv if hi_qkv is not None else lo_q
    b, h, w, nh, nl = dims[0], dims[1], dims[2], dims[5], dims[6]
    lse = like.new_empty((b, h * w, nl), dtype=acc_dtype(like.dtype))
    if like.numel():
        lib.hilo_forward_in_place(
            dtype_name(like.dtype), dims, scale, num_threads(),
            _b(hi_qkv), None if hi_pad_kv is None else buf(hi_pad_kv), _b(lo_q), _b(lo_kv), buf(lse),
        )
    hi = None if hi_qkv is None else hi_qkv[..., : nh * head_dim]
    return hi, lo_q


class HiLoAttentionFunction(torch.autograd.Function):
    """``torch.autograd.Function`` drop-in: ``HiLoAttentionFunction.apply(hi_qkv, lo_q, lo_kv,
    window_size, head_dim, scale=None, hi_pad_kv=None)`` → ``(hi_out, lo_out)`` (None for an
    absent branch); calls the ``fastattn::hilo_*`` ops."""

    @staticmethod
    def forward(ctx, hi_qkv, lo_q, lo_kv, window_size, head_dim, scale=None, hi_pad_kv=None):
        scale, _ = _prepare(hi_qkv, lo_q, lo_kv, window_size, head_dim, scale, hi_pad_kv)
        inputs = (hi_qkv, hi_pad_kv, lo_q, lo_kv, window_size, head_dim, scale)
        output = torch.ops.fastattn.hilo_fwd(*inputs)
        _save(ctx, inputs, output)
        hi, lo, _ = output
        return (hi if hi_qkv is not None else None), (lo if lo_q is not None else None)

    @staticmethod
    def backward(ctx, d_hi_out, d_lo_out):
        d_hi, d_pad, d_lo_q, d_lo_kv = _run_backward(ctx, d_hi_out, d_lo_out)
        return d_hi, d_lo_q, d_lo_kv, None, None, None, d_pad
