"""Linear attention with flash-linear-attention semantics (docs/linear.md), written plainly: the
oracle for :func:`fastattn.linear_attention`. Causal outputs come from an explicit running
sum over time (one state update per token), per ``cu_seqlens`` segment."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = {
    None: lambda x: x,
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}


def _feature_map(feature_map):
    if callable(feature_map):
        return feature_map
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(k for k in FEATURE_MAPS if k)} or a callable, got {feature_map!r}")
    return FEATURE_MAPS[feature_map]


def _one_sequence(q, k, v, kv0, z0, normalize, causal):
    """q, k ``[T, H, K]`` (already mapped and scaled: q carries the scale), v ``[T, H, V]``;
    kv0 ``[H, K, V]``, z0 ``[H, K]``. Returns o ``[T, H, V]``, kv, z."""
    if not causal:
        kv = kv0 + torch.einsum("thk,thv->hkv", k, v)
        z = z0 + k.sum(dim=0)
        o = torch.einsum("thk,hkv->thv", q, kv)
        if normalize:
            o = o / (torch.einsum("thk,hk->th", q, z)[..., None] + 1e-10)
        return o, kv, z
    kv, z, outs = kv0, z0, []
    for t in range(q.shape[0]):
        kv = kv + torch.einsum("hk,hv->hkv", k[t], v[t])
        z = z + k[t]
        o_t = torch.einsum("hk,hkv->hv", q[t], kv)
        if normalize:
            o_t = o_t / (torch.einsum("hk,hk->h", q[t], z)[:, None] + 1e-10)
        outs.append(o_t)
    o = torch.stack(outs) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    return o, kv, z


def linear_attention(
    q,
    k,
    v,
    scale=None,
    initial_state=None,
    output_final_state=False,
    normalize=True,
    cu_seqlens=None,
    *,
    causal=True,
    feature_map=None,
):
    """``o_t = Σ_{j≤t} (scale φ(q_t)·φ(k_j)) v_j`` (all j when ``causal=False``), divided by
    ``Σ_{j≤t} scale φ(q_t)·φ(k_j) + 1e-10`` when ``normalize``; layout ``[B, T, H, K]``.

    As fla's ``chunk_linear_attn``: ``scale`` defaults to ``K ** -0.5`` and applies after the
    feature map; ``initial_state`` is ``kv [N, H, K, V]`` or, when normalizing, the pair
    ``(kv, z [N, 1, H, K])`` (a bare tensor is kv with z = 0); with ``normalize`` the result
    state is ``(kv or None, z)`` (z always, kv only with ``output_final_state``), otherwise
    ``kv`` or None. ``cu_seqlens`` (``[N+1]``, B = 1) packs N sequences with a state each.
    Computes in float32 for half inputs (float64 for float64) and returns the inputs' dtype;
    states are in that accumulation dtype. ``causal=False`` returns ``(o, None)``.
    """
    phi = _feature_map(feature_map)
    dtype = q.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    if scale is None:
        scale = kd**-0.5
    q = phi(q.to(acc)) * scale
    k = phi(k.to(acc))
    v = v.to(acc)

    if normalize and isinstance(initial_state, tuple):
        kv_init, z_init = initial_state
    else:
        kv_init, z_init = initial_state, None
    if cu_seqlens is None:
        bounds = [(i, 0, t) for i in range(b)]
    else:
        if b != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got {b}")
        cu = [int(x) for x in cu_seqlens]
        bounds = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]

    o = torch.zeros(b, t, h, vd, dtype=acc, device=q.device)
    kvs, zs = [], []
    for n, (bi, s, e) in enumerate(bounds):
        kv0 = q.new_zeros(h, kd, vd) if kv_init is None else kv_init[n].to(acc)
        z0 = q.new_zeros(h, kd) if z_init is None else z_init[n, 0].to(acc)
        o_seq, kv, z = _one_sequence(q[bi, s:e], k[bi, s:e], v[bi, s:e], kv0, z0, normalize, causal)
        o[bi, s:e] = o_seq
        kvs.append(kv)
        zs.append(z)
    o = o.to(dtype)
    if not causal:
        return o, None
    kv_final = torch.stack(kvs) if output_final_state else None
    if normalize:
        return o, (kv_final, torch.stack(zs)[:, None])
    return o, kv_final
