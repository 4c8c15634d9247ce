"""Neighborhood attention with NATTEN 0.21 semantics (docs/neighborhood.md), written plainly: it builds
the full ``[N, N]`` neighbourhood mask and runs masked softmax attention. The oracle for
fastattn's neighborhood kernels."""

from __future__ import annotations

import torch

from .._checks import na_arguments as check_arguments


def na_window(i, length, kernel_size, stride=1, dilation=1, is_causal=False):
    """The key indices query ``i`` sees on one dimension of ``length`` (docs/neighborhood.md)."""
    k, s, d = kernel_size, stride, dilation
    g, ii = i % d, i // d
    n = (length - g + d - 1) // d  # length of dilation group g
    if is_causal:
        leader = min((ii // s) * s + s - 1, n - 1)
        start = max(leader - (k - 1), 0)
        end = min(ii + 1, n)
    else:
        leader = min((ii // s) * s + s // 2, n - 1)
        start = max(0, min(leader - k // 2, n - k))
        end = start + k
    return [j * d + g for j in range(start, end)]


def neighborhood_mask(spatial_shape, kernel_size, stride=1, dilation=1, is_causal=False):
    """``bool [N, N]``: ``mask[q, kv]`` iff key ``kv`` lies in query ``q``'s window on every
    dimension (row-major flattening of ``spatial_shape``)."""
    ks, ss, ds, cs = check_arguments(spatial_shape, kernel_size, stride, dilation, is_causal)
    mask = torch.ones((), dtype=torch.bool)
    for dim, (L, k, s, d, c) in enumerate(zip(spatial_shape, ks, ss, ds, cs)):
        m = torch.zeros(L, L, dtype=torch.bool)
        for i in range(L):
            m[i, na_window(i, L, k, s, d, c)] = True
        # Outer AND: dims so far × this dim, keeping (query, key) index pairs row-major.
        mask = (mask[..., None, :, None] & m[None, :, None, :]) if dim else m
        if dim:
            n_prev = mask.shape[0] * mask.shape[1]
            mask = mask.reshape(n_prev, n_prev)
    return mask


def neighborhood_attention(
    query,
    key,
    value,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale=None,
    additional_keys=None,
    additional_values=None,
    return_lse=False,
):
    """NATTEN's ``na{1,2,3}d`` on ``[B, *spatial, H, D]`` (rank from the input). GQA: query
    head ``h`` uses kv head ``h // (H // H_kv)``. ``additional_keys/values [B, n, H_kv, D]``
    are attended by every query without a mask (softmax over the union). lse
    ``[B, *spatial, H]``."""
    if query.dim() < 4 or query.dim() > 6:
        raise ValueError(f"query must be [B, *spatial (1-3 dims), H, D], got shape {tuple(query.shape)}")
    spatial = tuple(query.shape[1:-2])
    if key.shape[:-2] != query.shape[:-2] or value.shape[:-2] != query.shape[:-2]:
        raise ValueError("query, key and value must share batch and spatial shape")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError("key head_dim differs from query head_dim")
    if key.shape[-2] != value.shape[-2] or query.shape[-2] % key.shape[-2]:
        raise ValueError("query heads must be a multiple of key/value heads, which must match")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    b, h, dq = query.shape[0], query.shape[-2], query.shape[-1]
    n = 1
    for x in spatial:
        n *= x
    mask = neighborhood_mask(spatial, kernel_size, stride, dilation, is_causal).to(query.device)
    q = query.reshape(b, n, h, dq)
    k = key.reshape(b, n, key.shape[-2], dq)
    v = value.reshape(b, n, value.shape[-2], value.shape[-1])
    if additional_keys is not None:
        k = torch.cat([k, additional_keys], dim=1)
        v = torch.cat([v, additional_values], dim=1)
        extra = torch.ones(n, additional_keys.shape[1], dtype=torch.bool, device=query.device)
        mask = torch.cat([mask, extra], dim=1)
    group = h // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    if scale is None:
        scale = dq**-0.5
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", torch.exp(s - lse[..., None]), v)
    out = out.reshape(b, *spatial, h, v.shape[-1])
    if return_lse:
        return out, lse.transpose(1, 2).reshape(b, *spatial, h).to(torch.float64 if query.dtype == torch.float64 else torch.float32)
    return out


def _rank_checked(rank, name):
    def fn(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
           additional_keys=None, additional_values=None, return_lse=False):
        if query.dim() != rank + 3:
            raise ValueError(f"{name} expects query of rank {rank + 3} [B, *{rank} spatial, H, D], got {query.dim()}")
        return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                                      additional_keys, additional_values, return_lse)

    fn.__name__ = name
    fn.__doc__ = f"{rank}-D neighborhood attention; see :func:`neighborhood_attention`."
    return fn


na1d = _rank_checked(1, "na1d")
na2d = _rank_checked(2, "na2d")
na3d = _rank_checked(3, "na3d")
