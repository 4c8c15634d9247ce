"""Flow-Attention (Flowformer, docs/flow.md): ``flow_attention(q, k, v, causal=False, eps=1e-6)``.

Heads-last ``[B, T, H, D]``; ``φ = sigmoid`` is applied inside (pass the projected, not yet
mapped, queries and keys, as Flowformer's modules do); no softmax scale. Non-causal allows
``Tq != Tk``; causal needs ``Tq == Tk`` and runs as one streaming pass with a ``D×Dv`` state
per head (O(T·D·Dv) time, O(D·Dv) extra memory), never the original's ``[T, D, Dv]`` cumsum.

Torch ops: ``fastattn::flow_attention_fwd`` → ``out`` and ``fastattn::flow_attention_bwd`` →
``(dq, dk, dv)`` (the backward recomputes the per-row flows; nothing but the inputs is
saved). Autograd is registered on the forward (double backward is not supported).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._native import lib, num_threads
from ._torch import buf, check_tensors, direct, dtype_name, no_cuda_kernel

__all__ = ["flow_attention", "FlowAttentionFunction"]


def flow_dims(q_shape, k_shape, v_shape, causal: bool) -> tuple[int, int, int, int, int, int]:
    """Validates shapes; returns ``(batch, q_len, kv_len, heads, head_dim, v_head_dim)``."""
    layout = "[batch, seqlen, heads, head_dim]"
    _checks.check_rank("q", q_shape, 4, layout)
    _checks.check_rank("k", k_shape, 4, layout)
    _checks.check_rank("v", v_shape, 4, layout)
    b, n, h, d = q_shape
    bk, m, hk, dk = k_shape
    bv, mv, hv, dv = v_shape
    if bk != b or bv != b:
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {bv}")
    if mv != m:
        raise ValueError(f"k and v sequence lengths differ: k {m}, v {mv}")
    if hk != h or hv != h:
        raise ValueError(f"head counts differ: q {h}, k {hk}, v {hv}")
    if dk != d:
        raise ValueError(f"k head_dim {dk} differs from q head_dim {d}")
    if d == 0 or dv == 0:
        raise ValueError(f"head dims must be positive, got q/k {d}, v {dv}")
    if causal and n != m:
        raise ValueError(f"causal flow attention needs equal q and k sequence lengths, got q {n}, k {m}")
    return b, n, m, h, d, dv


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not eps >= 0.0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite non-negative float, got {eps}")
    return eps


@torch.library.custom_op("fastattn::flow_attention_fwd", mutates_args=(), device_types="cpu")
def flow_attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, eps: float) -> Tensor:
    return _forward_cpu(q, k, v, causal, eps, flow_dims(q.shape, k.shape, v.shape, causal))


def _forward_cpu(q, k, v, causal, eps, dims) -> Tensor:
    """The CPU kernel on validated inputs (``dims`` from :func:`flow_dims`)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, n, _, h, _, dv = dims
    out = q.new_empty((b, n, h, dv))
    lib.flow_attention_forward(dtype_name(q.dtype), dims, causal, eps, num_threads(), buf(q), buf(k), buf(v), buf(out))
    return out


@flow_attention_fwd.register_fake
def _(q, k, v, causal, eps):
    b, n, h, _ = q.shape
    return q.new_empty((b, n, h, v.shape[-1]))


flow_attention_fwd.register_kernel("cuda")(no_cuda_kernel("flow_attention_fwd"))


@torch.library.custom_op("fastattn::flow_attention_bwd", mutates_args=(), device_types="cpu")
def flow_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    dims = flow_dims(q.shape, k.shape, v.shape, causal)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lib.flow_attention_backward(
        dtype_name(q.dtype), dims, causal, eps, num_threads(),
        buf(q), buf(k), buf(v), buf(dout), buf(dq), buf(dk), buf(dv),
    )
    return dq, dk, dv


@flow_attention_bwd.register_fake
def _(dout, q, k, v, causal, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


flow_attention_bwd.register_kernel("cuda")(no_cuda_kernel("flow_attention_bwd"))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, eps = inputs
    ctx.save_for_backward(q, k, v)
    ctx.causal, ctx.eps = causal, eps


def _backward(ctx, dout):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastattn.flow_attention_bwd(dout, q, k, v, ctx.causal, ctx.eps)
    return dq, dk, dv, None, None


flow_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _prepare(q, k, v, causal, eps):
    """Validates the call; returns ``(eps, dims)``."""
    check_tensors(q=q, k=k, v=v)
    _checks.check_bool("causal", causal)
    dims = flow_dims(q.shape, k.shape, v.shape, causal)
    return _check_eps(eps), dims


def flow_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, eps: float = 1e-6) -> Tensor:
    """Flow-Attention over heads-last tensors (docs/flow.md).

    Args:
        q: ``[B, Tq, H, D]`` (before the sigmoid feature map, which is applied inside).
        k: ``[B, Tk, H, D]``; v: ``[B, Tk, H, Dv]``.
        causal: Flowformer's causal variant (needs ``Tq == Tk``).
        eps: Flowformer's ``eps``.

    Returns ``[B, Tq, H, Dv]`` in the inputs' dtype (float32/float64/bfloat16/float16; half
    types accumulate in float32). Differentiable in q, k, v.
    """
    eps, dims = _prepare(q, k, v, causal, eps)
    if direct(q, k, v):
        return _forward_cpu(q, k, v, causal, eps, dims)
    return torch.ops.fastattn.flow_attention_fwd(q, k, v, causal, eps)


class FlowAttentionFunction(torch.autograd.Function):
    """``torch.autograd.Function`` drop-in: ``FlowAttentionFunction.apply(q, k, v,
    causal=False, eps=1e-6)`` → ``out``; calls the ``fastattn::flow_attention_*`` ops."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, eps=1e-6):
        eps, _ = _prepare(q, k, v, causal, eps)
        ctx.save_for_backward(q, k, v)
        ctx.causal, ctx.eps = causal, eps
        return torch.ops.fastattn.flow_attention_fwd(q, k, v, causal, eps)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastattn.flow_attention_bwd(dout, q, k, v, ctx.causal, ctx.eps)
        return dq, dk, dv, None, None
