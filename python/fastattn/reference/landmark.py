"""Landmark attention (Mohtashami & Jaggi, docs/landmark.md), written plainly: the grouped softmax of
the training form, and top-k block retrieval for inference. Oracles for fastattn's landmark
kernels. Layout ``[B, T, H, D]``."""

from __future__ import annotations

import torch


def _grouped_softmax_attention(q, k, v, block_size, scale, q_pos, select=None):
    """Core of both forms. ``q_pos[i]``: cache position of query ``i``. ``select``: optional
    bool ``[B, H, Tq, G]`` of the earlier blocks a query may use (retrieval)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (mem_freq + 1), got {block_size}")
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    if scale is None:
        scale = d**-0.5
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # [B, H, Tq, Tk]
    dev = q.device
    j = torch.arange(tk, device=dev)
    is_landmark = j % block_size == block_size - 1
    q_block = q_pos // block_size  # [Tq]
    k_block = j // block_size  # [Tk]
    n_complete = tk // block_size  # blocks whose landmark is in the cache

    # Own block: regular tokens up to the query (its own landmark excluded).
    local = (k_block[None, :] == q_block[:, None]) & (j[None, :] <= q_pos[:, None]) & ~is_landmark[None, :]
    local_logits = s.masked_fill(~local, float("-inf"))

    # Earlier complete blocks, gated by their landmark's score.
    g = torch.arange(n_complete, device=dev)
    gate_ok = g[None, :] < q_block[:, None]  # [Tq, G]
    gate_ok = gate_ok.expand(b, h, tq, n_complete)
    if select is not None:
        gate_ok = gate_ok & select
    landmarks = g * block_size + block_size - 1
    gate_logits = s[..., landmarks].masked_fill(~gate_ok, float("-inf"))  # [B, H, Tq, G]

    z = torch.logsumexp(torch.cat([local_logits, gate_logits], dim=-1), dim=-1, keepdim=True)
    weights = torch.exp(local_logits - z)  # [B, H, Tq, Tk]
    if n_complete:
        span = n_complete * block_size
        inner = s[..., :span].reshape(b, h, tq, n_complete, block_size)
        inner = inner.masked_fill(is_landmark[:span].reshape(n_complete, block_size), float("-inf"))
        inner = torch.softmax(inner, dim=-1)  # within each block, over its regular tokens
        gated = torch.exp(gate_logits - z)[..., None] * inner
        weights = weights + torch.nn.functional.pad(gated.reshape(b, h, tq, span), (0, tk - span))
    return torch.einsum("bhij,bjhd->bihd", weights, v)


def landmark_attention(q, k, v, block_size, scale=None):
    """Training form over a whole sequence (``Tq == Tk``): query ``i`` in block ``b`` attends
    to the regular tokens ``j <= i`` of block ``b`` and, for each earlier block ``g``, to its
    regular tokens with weight ``exp(s_{i,l_g})/Z_i · softmax_g(s_ij)``. The last token of every
    block is its landmark (weight 0); a trailing incomplete block has no landmark yet."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"landmark_attention needs Tq == Tk, got {q.shape[1]} and {k.shape[1]}")
    pos = torch.arange(q.shape[1], device=q.device)
    return _grouped_softmax_attention(q, k, v, block_size, scale, pos)


def landmark_retrieval_attention(q, k, v, block_size, top_k, scale=None):
    """Inference form. ``q [B, Tq, H, D]`` are the last ``Tq`` positions of the cache
    ``k, v [B, Tk, H_kv, D]`` (complete blocks plus an incomplete tail). Each (batch, head,
    query) keeps only the ``top_k`` earlier complete blocks with the largest landmark score
    (all of them when fewer exist; ties go to the earlier block), then attends with the
    training form's grouped softmax to its own block's causal context plus those blocks."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    b, tq, h, d = q.shape
    tk = k.shape[1]
    if tq > tk:
        raise ValueError(f"more queries ({tq}) than cached keys ({tk})")
    pos = torch.arange(tk - tq, tk, device=q.device)
    n_complete = tk // block_size
    if scale is None:
        scale = d**-0.5
    kh = k.repeat_interleave(h // k.shape[2], dim=2)
    landmarks = torch.arange(n_complete, device=q.device) * block_size + block_size - 1
    score = torch.einsum("bihd,bghd->bhig", q, kh[:, landmarks]) * scale  # [B, H, Tq, G]
    earlier = torch.arange(n_complete, device=q.device)[None, :] < (pos // block_size)[:, None]
    score = score.masked_fill(~earlier, float("-inf"))
    # Rank blocks by score, earlier block first among equals (stable sort).
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n_complete, device=q.device).expand_as(order))
    select = (rank < top_k) & earlier
    return _grouped_softmax_attention(q, k, v, block_size, scale, pos, select)
