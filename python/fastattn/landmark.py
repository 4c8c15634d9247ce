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

__all__ = ["landmark_attention", "LandmarkAttentionFunction", "fused_landmark_attention",
           "landmark_retrieval_attention"]


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
    if dk.numel():  # Tk >= Tq: no keys means no queries either
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


# --- retrieval (inference) -------------------------------------------------------------------

SELECTIONS = ("per_token_and_head", "max_over_heads", "max_over_tokens")


def retrieval_dims(q_shape, k_shape, v_shape, block_size, top_k, selection, return_indices) -> tuple[int, ...]:
    """Validates a retrieval call's shapes and options (torch and numpy alike); returns
    ``(B, Tq, Tk, H, H_kv, D, Dv)``."""
    b, tq, tk, hq, hkv, d, dv = _checks.attention_dims(q_shape, k_shape, v_shape, ("q", "k_cache", "v_cache"))
    if hq == 0 or hkv == 0 or d == 0 or dv == 0:
        raise ValueError(f"head counts and dims must be positive, got q {tuple(q_shape)}, v_cache {tuple(v_shape)}")
    if tq > tk:
        raise ValueError(f"q has more positions ({tq}) than k_cache ({tk}): the queries are the cache's last positions")
    check_block_size(block_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not isinstance(selection, str) or selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    _checks.check_bool("return_indices", return_indices)
    return b, tq, tk, hq, hkv, d, dv


def _retrieval_args(q, k_cache, v_cache, block_size, top_k, scale, selection, return_indices):
    check_tensors(q=q, k_cache=k_cache, v_cache=v_cache)
    dims = retrieval_dims(q.shape, k_cache.shape, v_cache.shape, block_size, top_k, selection, return_indices)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise RuntimeError("landmark_retrieval_attention is inference only (no backward): call it under "
                           "torch.no_grad() or with inputs that do not require grad")
    return _checks.check_scale(scale, dims[5] ** -0.5), dims


def _retrieval_cpu(q, k_cache, v_cache, block_size, top_k, scale, selection, dims):
    """The Rust kernel (rust/kernels/src/landmark/retrieval.rs): ``(out, kept)``."""
    b, tq, tk, hq, hkv, d, dv = dims
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    out = q.new_empty((b, tq, hq, dv))
    kept = torch.empty((b, hq, tq, top_k), dtype=torch.int64)
    if out.numel():
        lib.landmark_retrieval(dtype_name(q.dtype), (b, tq, tk, hq, hkv, d, dv, block_size), scale, top_k, selection,
                               num_threads(), buf(q), buf(k_cache), buf(v_cache), buf(out), buf(kept))
    return out, kept


def landmark_retrieval_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_size: int, top_k: int,
                                 scale: float | None = None, selection: str = "per_token_and_head",
                                 return_indices: bool = False):
    """Landmark attention for inference (docs/landmark.md, Retrieval): each query keeps the
    ``top_k`` earlier complete blocks ranked best by its landmark probabilities and attends,
    with the training form's grouped softmax, to its own causal context plus those blocks.

    Args:
        q: ``[B, Tq, H, D]``, the cache's last ``Tq`` positions (``Tq = 1`` for decode).
        k_cache: ``[B, Tk, H_kv, D]``; v_cache: ``[B, Tk, H_kv, Dv]`` (complete blocks and a tail).
        block_size: tokens per block, landmark included (≥ 2).
        top_k: blocks kept per query (≥ 0; all candidates when it has fewer).
        scale: default ``D ** -0.5``.
        selection: ``"per_token_and_head"``, ``"max_over_heads"`` or ``"max_over_tokens"``.
        return_indices: also return the kept blocks ``[B, H, Tq, top_k]`` (int64, best first,
            ``-1`` for unused slots).

    Work per query: its landmark scores (one per complete block), then ``top_k`` blocks and its
    own block, never the whole cache. Forward only: a ``RuntimeError`` if a gradient is needed.
    """
    scale, dims = _retrieval_args(q, k_cache, v_cache, block_size, top_k, scale, selection, return_indices)
    if q.device.type == "cpu":
        out, kept = _retrieval_cpu(q, k_cache, v_cache, block_size, top_k, scale, selection, dims)
        return (out, kept) if return_indices else out
    return _retrieval_torch(q, k_cache, v_cache, block_size, top_k, scale, selection, return_indices, dims)


def _retrieval_torch(q, k_cache, v_cache, block_size, top_k, scale, selection, return_indices, dims):
    """The same retrieval in PyTorch ops, for tensors off the CPU until a CUDA kernel lands
    (and the tests' second implementation)."""
    b, tq, tk, hq, hkv, d, dv = dims
    bs, group, dev = block_size, hq // hkv, q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qa = q.to(acc)
    pos = torch.arange(tk - tq, tk, device=dev)  # [Tq]
    qblock = pos // bs
    n_blocks = tk // bs  # complete blocks: each has its landmark in the cache
    kv_head = torch.arange(hq, device=dev) // group  # [H]

    # Landmark scores and the candidates' softmax probabilities: [B, H, Tq, G]
    land = k_cache[:, bs - 1:n_blocks * bs:bs].to(acc)  # [B, G, H_kv, D]
    gate = torch.einsum("bihd,bghd->bhig", qa, land[:, :, kv_head]) * scale
    cand = torch.arange(n_blocks, device=dev)[None, :] < qblock[:, None]  # [Tq, G]
    gate = gate.masked_fill(~cand, float("-inf"))
    probs = torch.softmax(gate, dim=-1).nan_to_num(0.0) if n_blocks else gate
    if selection == "max_over_heads":
        rank_by = probs.amax(dim=1, keepdim=True).expand_as(probs)
    elif selection == "max_over_tokens":
        rank_by = probs.masked_fill(~cand, float("-inf")).amax(dim=2, keepdim=True).expand_as(probs)
    else:
        rank_by = probs
    kk = min(top_k, n_blocks)
    rank_by = rank_by.masked_fill(~cand, float("-inf"))
    order = torch.sort(rank_by, dim=-1, descending=True, stable=True).indices[..., :kk]  # [B, H, Tq, kk]
    valid = torch.gather(cand.expand(b, hq, tq, n_blocks), -1, order) if kk else order.bool()
    idx = order.masked_fill(~valid, -1)

    # Kept blocks: each one item of the softmax, its value the in-block average.
    def block_rows(src, width):
        """src rows of the kept blocks: [B, H, Tq, kk, bs, width] (invalid slots read block 0)."""
        blocks = src[:, :n_blocks * bs].reshape(b, n_blocks, bs, hkv, width)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        return blocks[bi, order.clamp(min=0), :, kv_head[None, :, None, None]].to(acc)

    items, values = [], []
    if kk:
        kb, vb = block_rows(k_cache, d), block_rows(v_cache, dv)
        inner = torch.einsum("bhid,bhiksd->bhiks", qa.transpose(1, 2), kb[..., :bs - 1, :]) * scale
        avg = torch.einsum("bhiks,bhiksd->bhikd", torch.softmax(inner, dim=-1), vb[..., :bs - 1, :])
        items.append(torch.gather(gate, -1, order).masked_fill(~valid, float("-inf")))
        values.append(avg)
    # Own context: the regular tokens of the query's block up to the query.
    start = qblock * bs
    own_pos = start[:, None] + torch.arange(bs, device=dev)[None, :]  # [Tq, bs]
    own_ok = (own_pos <= pos[:, None]) & (own_pos % bs != bs - 1)
    own_pos = own_pos.clamp(max=tk - 1)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ko = k_cache[bi, own_pos[None, None], kv_head[None, :, None, None]].to(acc)  # [B, H, Tq, bs, D]
    vo = v_cache[bi, own_pos[None, None], kv_head[None, :, None, None]].to(acc)
    own = torch.einsum("bhid,bhisd->bhis", qa.transpose(1, 2), ko) * scale
    items.append(own.masked_fill(~own_ok, float("-inf")))
    values.append(vo)
    z = torch.logsumexp(torch.cat(items, dim=-1), dim=-1, keepdim=True)  # [B, H, Tq, 1]
    out = sum(torch.einsum("bhin,bhind->bhid", torch.exp(it - z), val) for it, val in zip(items, values))
    out = out.transpose(1, 2).to(q.dtype).contiguous()  # [B, Tq, H, Dv]
    if not return_indices:
        return out
    if kk < top_k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:3], top_k - kk), -1)], dim=-1)
    return out, idx
