"""Landmark attention (Mohtashami & Jaggi, docs/landmark.md), training form:
``landmark_attention(q, k, v, block_size=64, scale=None, return_lse=False)``.

Heads-last ``[B, T, H, D]``; the last token of every ``block_size`` tokens is its block's
landmark; GQA, ``Dv != D`` and ``Tq <= Tk`` (the queries are the last ``Tq`` positions, as in
chunked prefill). The grouped softmax runs fused, with nothing of size ``Tq × Tk`` in memory.

Torch ops: ``fastattn::landmark_fwd`` → ``(out, lse)`` and ``fastattn::landmark_bwd`` →
``(dq, dk, dv)``; autograd is registered on the forward (``lse`` is not differentiable).
:func:`fused_landmark_attention` is the original's head-first Triton entry point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._native import lib, num_threads
from ._torch import acc_dtype, buf, check_tensors, direct, dtype_name, no_cuda_kernel

__all__ = ["landmark_attention", "LandmarkAttentionFunction", "fused_landmark_attention"]


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (a landmark and one regular token), got {block_size}")
    return block_size


def landmark_dims(q_shape, k_shape, v_shape, block_size) -> tuple[int, ...]:
    """Validates shapes; returns the kernel's ``(batch, q_len, kv_len, q_heads, kv_heads,
    head_dim, v_head_dim, block)``."""
    b, tq, tk, hq, hkv, d, dv = _checks.attention_dims(q_shape, k_shape, v_shape)
    if hq == 0 or hkv == 0:
        raise ValueError(f"head counts must be positive, got q {hq}, k/v {hkv}")
    if d == 0 or dv == 0:
        raise ValueError(f"head dims must be positive, got q/k {d}, v {dv}")
    if tq > tk:
        raise ValueError(f"q has more positions ({tq}) than k ({tk}): the queries are the last Tq positions of the keys")
    return b, tq, tk, hq, hkv, d, dv, check_block_size(block_size)


def _forward_cpu(q, k, v, scale, dims):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, tq, _, hq, _, _, dv, _ = dims
    out = q.new_empty((b, tq, hq, dv))
    lse = q.new_empty((b, tq, hq), dtype=acc_dtype(q.dtype))
    if out.numel():
        lib.landmark_forward(dtype_name(q.dtype), dims, scale, num_threads(), buf(q), buf(k), buf(v), buf(out), buf(lse))
    return out, lse


@torch.library.custom_op("fastattn::landmark_fwd", mutates_args=(), device_types="cpu")
def landmark_fwd(q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float) -> tuple[Tensor, Tensor]:
    return _forward_cpu(q, k, v, scale, landmark_dims(q.shape, k.shape, v.shape, block_size))


@landmark_fwd.register_fake
def _(q, k, v, block_size, scale):
    b, tq, hq, _ = q.shape
    return q.new_empty((b, tq, hq, v.shape[-1])), q.new_empty((b, tq, hq), dtype=acc_dtype(q.dtype))


landmark_fwd.register_kernel("cuda")(no_cuda_kernel("landmark_fwd"))


@torch.library.custom_op("fastattn::landmark_bwd", mutates_args=(), device_types="cpu")
def landmark_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    dims = landmark_dims(q.shape, k.shape, v.shape, block_size)
    q, k, v, out, lse = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous()
    dout = dout.to(q.dtype).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dk.numel() or dq.numel():
        lib.landmark_backward(
            dtype_name(q.dtype), dims, scale, num_threads(),
            buf(q), buf(k), buf(v), buf(out), buf(dout), buf(lse), buf(dq), buf(dk), buf(dv),
        )
    return dq, dk, dv


@landmark_bwd.register_fake
def _(dout, q, k, v, out, lse, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


landmark_bwd.register_kernel("cuda")(no_cuda_kernel("landmark_bwd"))


def _setup_context(ctx, inputs, output):
    q, k, v, block_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.block_size, ctx.scale = block_size, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fastattn.landmark_bwd(dout, q, k, v, out, lse, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None


landmark_fwd.register_autograd(_backward, setup_context=_setup_context)


def _prepare(q, k, v, block_size, scale):
    check_tensors(q=q, k=k, v=v)
    dims = landmark_dims(q.shape, k.shape, v.shape, block_size)
    return _checks.check_scale(scale, q.shape[-1] ** -0.5), dims


def landmark_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int = 64, scale: float | None = None,
                       return_lse: bool = False):
    """Landmark attention's grouped softmax over heads-last tensors (docs/landmark.md).

    Args:
        q: ``[B, Tq, H, D]``, the last ``Tq`` positions of the keys (``Tq == Tk`` in training).
        k: ``[B, Tk, H_kv, D]``; v: ``[B, Tk, H_kv, Dv]`` (``H`` a multiple of ``H_kv``).
        block_size: tokens per block, landmark (the block's last token) included: the
            original's ``mem_freq + 1``. At least 2.
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of each row's grouped softmax ``[B, Tq, H]``
            (float32; float64 for float64).

    Returns ``[B, Tq, H, Dv]`` in the inputs' dtype (float32/float64/bfloat16/float16; half
    types accumulate in float32). Differentiable in q, k, v.
    """
    scale, dims = _prepare(q, k, v, block_size, scale)
    _checks.check_bool("return_lse", return_lse)
    if direct(q, k, v):
        out, lse = _forward_cpu(q, k, v, scale, dims)
    else:
        out, lse = torch.ops.fastattn.landmark_fwd(q, k, v, dims[-1], scale)
    return (out, lse) if return_lse else out


class LandmarkAttentionFunction(torch.autograd.Function):
    """``torch.autograd.Function`` drop-in: ``LandmarkAttentionFunction.apply(q, k, v,
    block_size=64, scale=None)`` → ``out``; calls the ``fastattn::landmark_*`` ops."""

    @staticmethod
    def forward(ctx, q, k, v, block_size=64, scale=None):
        scale, dims = _prepare(q, k, v, block_size, scale)
        out, lse = torch.ops.fastattn.landmark_fwd(q, k, v, dims[-1], scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_size, ctx.scale = dims[-1], scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastattn.landmark_bwd(dout, q, k, v, out, lse, ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None


def fused_landmark_attention(q: Tensor, k: Tensor, v: Tensor, is_mem: Tensor, sm_scale: float | None = None,
                             block_size: int = 64) -> Tensor:
    """The original's Triton entry point on fastattn's kernels: head-first ``q, k, v
    [B, H, T, D]``, ``is_mem`` bool ``[B, T]`` (or ``[T]``) marking the landmark tokens, which
    must be exactly the periodic positions ``t % block_size == block_size − 1``; ``sm_scale``
    defaults to ``D ** -0.5``. Returns ``[B, H, T, D]``; differentiable in q, k, v."""
    check_tensors(q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, t.shape, 4, "[batch, heads, seqlen, head_dim]")
    if not isinstance(is_mem, Tensor):
        raise TypeError(f"is_mem must be a bool tensor, got {type(is_mem).__name__}")
    if is_mem.dtype != torch.bool:
        raise TypeError(f"is_mem must be a bool tensor, got dtype {is_mem.dtype}")
    b, _, t, _ = q.shape
    if is_mem.shape not in ((b, t), (t,)):
        raise ValueError(f"is_mem must be [batch, seqlen] = [{b}, {t}] (or [{t}]), got {tuple(is_mem.shape)}")
    check_block_size(block_size)
    if is_mem.device.type != "meta":
        want = (torch.arange(t, device=is_mem.device) % block_size) == block_size - 1
        if not bool((is_mem == want).all()):
            raise ValueError(
                f"is_mem must mark exactly the last token of every block of {block_size} "
                "(positions t % block_size == block_size - 1); fastattn's kernel takes periodic landmarks only"
            )
    out = landmark_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_size, sm_scale)
    return out.transpose(1, 2)
