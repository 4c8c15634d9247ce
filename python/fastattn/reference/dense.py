"""Dense softmax attention, written plainly from the math (docs/attention.md): the oracle for
:func:`fastattn.attention`. Materialises the full score matrix; differentiable."""

from __future__ import annotations

import torch


def attention(q, k, v, is_causal=False, scale=None, return_lse=False):
    """``softmax(scale · q kᵀ) v`` on heads-last ``[B, T, H, D]`` tensors.

    GQA: query head ``h`` uses kv head ``h // (Hq // Hkv)``. Causal masking is bottom-right
    aligned (query ``i`` sees key ``j`` iff ``j <= i + Tk - Tq``); a query that sees no key
    gets output 0 and log-sum-exp ``-inf``.
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if scale is None:
        scale = d**-0.5
    group = hq // hkv if hkv else 1
    kh = k.repeat_interleave(group, dim=2)  # [B, Tk, Hq, D]
    vh = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kh) * scale  # [B, Hq, Tq, Tk]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if is_causal:
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        allowed = j <= i + (tk - tq)
    s = s.masked_fill(~allowed, float("-inf"))
    # Rows with no allowed key: keep them finite through the softmax, then zero them.
    has_key = allowed.any(dim=-1)  # [Tq]
    s_safe = torch.where(has_key[:, None], s, torch.zeros_like(s))
    lse = torch.logsumexp(s_safe, dim=-1)  # [B, Hq, Tq]
    p = torch.exp(s_safe - lse[..., None]) * has_key[:, None]
    out = torch.einsum("bhij,bjhd->bihd", p, vh)
    lse = torch.where(has_key, lse, torch.full_like(lse, float("-inf"))).transpose(1, 2)
    if return_lse:
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out
