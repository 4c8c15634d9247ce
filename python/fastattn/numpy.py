"""The ops on numpy arrays, calling the Rust kernels directly (no torch tensors involved).

float32, float64 and float16 arrays (numpy has no bfloat16); all inputs of a call share one
dtype. Results are new C-contiguous arrays. Semantics match the torch functions of the same
name (see their docstrings).
"""

from __future__ import annotations

import numpy as np

from . import _checks
from ._native import lib, num_threads

__all__ = [
    "attention",
    "attention_backward",
    "flow_attention",
    "flow_attention_backward",
    "hilo_attention",
    "hilo_attention_backward",
    "landmark_attention",
    "landmark_attention_backward",
    "landmark_retrieval_attention",
    "linear_attention",
    "linear_attention_backward",
    "neighborhood_attention",
    "neighborhood_attention_backward",
]

_NP_DTYPES = ("float32", "float64", "float16")


def _arrays(**named):
    out = []
    first_name = first = None
    for name, a in named.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
        _checks.check_dtype(name, a.dtype.name, _NP_DTYPES)
        if first is not None and a.dtype != first:
            raise TypeError(f"{name} has dtype {a.dtype.name} but {first_name} has {first.name}; they must match")
        if first is None:
            first_name, first = name, a.dtype
        out.append(np.ascontiguousarray(a))
    return out


def _buf(a: np.ndarray) -> tuple[int, int]:
    return (a.ctypes.data, a.size)


def _acc(dtype) -> np.dtype:
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


def _saved_rows(out, dout, lse, shape, dtype) -> np.ndarray:
    """Checks a backward's ``out`` ``[B, Tq, H, Dv]``, ``dout`` (the same shape) and ``lse``
    ``[B, Tq, H]`` (the accumulation dtype); returns ``lse`` contiguous."""
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    if dout.shape != out.shape:
        raise ValueError(f"dout must have shape {out.shape}, got {dout.shape}")
    if not isinstance(lse, np.ndarray) or lse.shape != shape[:3] or lse.dtype != _acc(dtype):
        raise ValueError(f"lse must be a {_acc(dtype).name} array of shape {shape[:3]}")
    return np.ascontiguousarray(lse)


def attention(q, k, v, is_causal=False, scale=None, return_lse=False):
    """Dense softmax attention on ``[B, T, H, D]`` arrays; see :func:`fastattn.attention`."""
    q, k, v = _arrays(q=q, k=k, v=v)
    dims = _checks.attention_dims(q.shape, k.shape, v.shape)
    _checks.check_bool("is_causal", is_causal)
    scale = _checks.check_scale(scale, q.shape[-1] ** -0.5 if q.shape[-1] else 1.0)
    b, tq, _, hq, _, _, dv = dims
    out = np.empty((b, tq, hq, dv), dtype=q.dtype)
    lse = np.empty((b, tq, hq), dtype=_acc(q.dtype))
    lib.attention_forward(q.dtype.name, dims, scale, is_causal, num_threads(), _buf(q), _buf(k), _buf(v), _buf(out), _buf(lse))
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, out, lse, is_causal=False, scale=None):
    """Gradients ``(dq, dk, dv)`` of :func:`attention` given the upstream gradient ``dout``
    and the forward's ``out`` and ``lse`` (``return_lse=True``)."""
    dout, q, k, v, out = _arrays(dout=dout, q=q, k=k, v=v, out=out)
    dims = _checks.attention_dims(q.shape, k.shape, v.shape)
    b, tq, _, hq, _, _, dv = dims
    lse = _saved_rows(out, dout, lse, (b, tq, hq, dv), q.dtype)
    _checks.check_bool("is_causal", is_causal)
    scale = _checks.check_scale(scale, q.shape[-1] ** -0.5 if q.shape[-1] else 1.0)
    dq, dk, dv_ = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    lib.attention_backward(
        q.dtype.name, dims, scale, is_causal, num_threads(),
        _buf(q), _buf(k), _buf(v), _buf(out), _buf(dout), _buf(lse), _buf(dq), _buf(dk), _buf(dv_),
    )
    return dq, dk, dv_


# --- linear attention and flow attention -------------------------------------------------


def _np_state(name, s, shape, acc):
    if s is None:
        return None
    if not isinstance(s, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or None, got {type(s).__name__}")
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(s.shape)}")
    _checks.check_dtype(name, s.dtype.name, _NP_DTYPES)
    return np.ascontiguousarray(s, dtype=acc)


def _linear_args(q, k, v, scale, initial_kv, initial_z, cu_seqlens, normalize, causal, feature_map):
    from .linear import FEATURE_MAPS

    q, k, v = _arrays(q=q, k=k, v=v)
    for name, a in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, a.shape, 4, "[batch, seqlen, heads, head_dim]")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {q.shape}, got {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q's first three dims {q.shape[:3]}, got {v.shape}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got q {q.shape[-1]}, v {v.shape[-1]}")
    _checks.check_bool("normalize", normalize)
    _checks.check_bool("causal", causal)
    fm = "identity" if feature_map is None else feature_map
    if fm not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be None or one of {FEATURE_MAPS}, got {feature_map!r}")
    scale = _checks.check_scale(scale, q.shape[-1] ** -0.5)
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    if cu_seqlens is not None:
        cu = np.asarray(cu_seqlens)
        if cu.dtype.kind not in "iu" or cu.ndim != 1 or cu.shape[0] < 2:
            raise ValueError("cu_seqlens must be a 1-D integer array with at least 2 entries")
        if b != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got {b}")
        if cu[0] != 0 or cu[-1] != t or np.any(np.diff(cu) < 0):
            raise ValueError(f"cu_seqlens must be sorted, start at 0 and end at {t}")
        cu_seqlens = np.ascontiguousarray(cu, dtype=np.int64)
    n = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if not causal and (initial_kv is not None or initial_z is not None):
        raise ValueError("initial states are only defined for causal=True")
    acc = _acc(q.dtype)
    initial_kv = _np_state("initial_kv", initial_kv, (n, h, kd, vd), acc)
    initial_z = _np_state("initial_z", initial_z, (n, 1, h, kd), acc)
    opt = lambda a: None if a is None else _buf(a)  # noqa: E731
    return q, k, v, scale, initial_kv, initial_z, cu_seqlens, fm, (b, t, h, kd, vd), n, acc, opt


def linear_attention(q, k, v, scale=None, initial_kv=None, initial_z=None, normalize=True, cu_seqlens=None,
                     causal=True, feature_map=None):
    """Linear attention on ``[B, T, H, K]`` arrays; see :func:`fastattn.linear_attention`.
    Returns ``(o, final_kv [N, H, K, V], final_z [N, 1, H, K])`` (states always returned,
    float32 or float64)."""
    q, k, v, scale, kv0, z0, cu, fm, dims, n, acc, opt = _linear_args(
        q, k, v, scale, initial_kv, initial_z, cu_seqlens, normalize, causal, feature_map)
    b, t, h, kd, vd = dims
    out = np.empty((b, t, h, vd), dtype=q.dtype)
    fkv = np.empty((n, h, kd, vd), dtype=acc)
    fz = np.empty((n, 1, h, kd), dtype=acc)
    lib.linear_attention_forward(q.dtype.name, dims, scale, causal, normalize, fm, num_threads(),
                                 _buf(q), _buf(k), _buf(v), opt(kv0), opt(z0), opt(cu), _buf(out), _buf(fkv), _buf(fz))
    return out, fkv, fz


def linear_attention_backward(dout, q, k, v, scale=None, initial_kv=None, initial_z=None, normalize=True,
                              cu_seqlens=None, causal=True, feature_map=None, d_final_kv=None, d_final_z=None):
    """Gradients ``(dq, dk, dv, d_initial_kv, d_initial_z)`` of :func:`linear_attention`
    (the state gradients are None where no initial state was given)."""
    q, k, v, scale, kv0, z0, cu, fm, dims, n, acc, opt = _linear_args(
        q, k, v, scale, initial_kv, initial_z, cu_seqlens, normalize, causal, feature_map)
    b, t, h, kd, vd = dims
    (dout,) = _arrays(dout=np.asarray(dout, dtype=q.dtype))
    if dout.shape != (b, t, h, vd):
        raise ValueError(f"dout must have shape {(b, t, h, vd)}, got {dout.shape}")
    gkv = _np_state("d_final_kv", d_final_kv, (n, h, kd, vd), acc)
    gz = _np_state("d_final_z", d_final_z, (n, 1, h, kd), acc)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    dkv0 = np.empty((n, h, kd, vd) if kv0 is not None else (0,), dtype=acc)
    dz0 = np.empty((n, 1, h, kd) if z0 is not None else (0,), dtype=acc)
    lib.linear_attention_backward(q.dtype.name, dims, scale, causal, normalize, fm, num_threads(),
                                  _buf(q), _buf(k), _buf(v), opt(kv0), opt(z0), opt(cu), _buf(dout), opt(gkv), opt(gz),
                                  _buf(dq), _buf(dk), _buf(dv), _buf(dkv0), _buf(dz0))
    return dq, dk, dv, (dkv0 if kv0 is not None else None), (dz0 if z0 is not None else None)


def flow_attention(q, k, v, causal=False, eps=1e-6):
    """Flow-Attention on ``[B, T, H, D]`` arrays; see :func:`fastattn.flow_attention`."""
    from .flow import _check_eps, flow_dims

    q, k, v = _arrays(q=q, k=k, v=v)
    _checks.check_bool("causal", causal)
    dims = flow_dims(q.shape, k.shape, v.shape, causal)
    eps = _check_eps(eps)
    b, n, _, h, _, dv = dims
    out = np.empty((b, n, h, dv), dtype=q.dtype)
    lib.flow_attention_forward(q.dtype.name, dims, causal, eps, num_threads(), _buf(q), _buf(k), _buf(v), _buf(out))
    return out


def flow_attention_backward(dout, q, k, v, causal=False, eps=1e-6):
    """Gradients ``(dq, dk, dv)`` of :func:`flow_attention` given ``dout``."""
    from .flow import _check_eps, flow_dims

    dout, q, k, v = _arrays(dout=dout, q=q, k=k, v=v)
    _checks.check_bool("causal", causal)
    dims = flow_dims(q.shape, k.shape, v.shape, causal)
    eps = _check_eps(eps)
    b, n, _, h, _, dv = dims
    if dout.shape != (b, n, h, dv):
        raise ValueError(f"dout must have shape {(b, n, h, dv)}, got {dout.shape}")
    dq, dk, dv_ = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    lib.flow_attention_backward(q.dtype.name, dims, causal, eps, num_threads(),
                                _buf(q), _buf(k), _buf(v), _buf(dout), _buf(dq), _buf(dk), _buf(dv_))
    return dq, dk, dv_


# --- neighborhood attention --------------------------------------------------------------


def _na_args(query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys, additional_values):
    named = _checks.na_inputs(query, key, value, additional_keys, additional_values)
    named = dict(zip(named, _arrays(**named)))
    dims, params = _checks.na_call(named, kernel_size, stride, dilation, is_causal, scale)
    q, k, v = named["query"], named["key"], named["value"]
    b, _, _, hkv, d, dv, _ = dims
    ak = named.get("additional_keys", np.empty((b, 0, hkv, d), dtype=q.dtype))
    av = named.get("additional_values", np.empty((b, 0, hkv, dv), dtype=q.dtype))
    return q, k, v, ak, av, dims, params


def neighborhood_attention(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                           additional_keys=None, additional_values=None, return_lse=False):
    """Neighborhood attention on ``[B, *spatial, H, D]`` arrays (1-3 spatial dims); see
    :func:`fastattn.neighborhood_attention`."""
    q, k, v, ak, av, dims, params = _na_args(query, key, value, kernel_size, stride, dilation, is_causal,
                                             scale, additional_keys, additional_values)
    out = np.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)
    lse = np.empty(q.shape[:-1], dtype=_acc(q.dtype))
    lib.na_forward(q.dtype.name, dims, params, num_threads(),
                   _buf(q), _buf(k), _buf(v), _buf(ak), _buf(av), _buf(out), _buf(lse))
    return (out, lse) if return_lse else out


def neighborhood_attention_backward(dout, query, key, value, out, lse, kernel_size, stride=1, dilation=1,
                                    is_causal=False, scale=None, additional_keys=None, additional_values=None):
    """Gradients ``(dq, dk, dv, d_additional_keys, d_additional_values)`` of
    :func:`neighborhood_attention` given ``dout`` and the forward's ``out`` and ``lse``
    (``return_lse=True``); the last two are ``None`` without additional keys/values."""
    q, k, v, ak, av, dims, params = _na_args(query, key, value, kernel_size, stride, dilation, is_causal,
                                             scale, additional_keys, additional_values)
    dout, out = _arrays(dout=dout, out=out)
    if out.dtype != q.dtype:
        raise TypeError(f"out has dtype {out.dtype.name} but query has {q.dtype.name}; they must match")
    shape = (*q.shape[:-1], v.shape[-1])
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    if dout.shape != shape:
        raise ValueError(f"dout must have shape {shape}, got {dout.shape}")
    if not isinstance(lse, np.ndarray) or lse.shape != q.shape[:-1] or lse.dtype != _acc(q.dtype):
        raise ValueError(f"lse must be a {_acc(q.dtype).name} array of shape {q.shape[:-1]}")
    lse = np.ascontiguousarray(lse)
    grads = tuple(np.empty_like(a) for a in (q, k, v, ak, av))
    lib.na_backward(q.dtype.name, dims, params, num_threads(),
                    _buf(q), _buf(k), _buf(v), _buf(ak), _buf(av), _buf(out), _buf(dout), _buf(lse),
                    tuple(_buf(g) for g in grads))
    if additional_keys is None:
        return grads[:3] + (None, None)
    return grads


# --- HiLo ------------------------------------------------------------------------------------


def _hilo_args(hi_qkv, lo_q, lo_kv, hi_pad_kv, window_size, head_dim, scale):
    named = {k: a for k, a in (("hi_qkv", hi_qkv), ("lo_q", lo_q), ("lo_kv", lo_kv), ("hi_pad_kv", hi_pad_kv))
             if a is not None}
    arrays = dict(zip(named, _arrays(**named)))
    shape = lambda n: arrays[n].shape if n in arrays else None  # noqa: E731
    dims = _checks.hilo_dims(shape("hi_qkv"), shape("lo_q"), shape("lo_kv"), shape("hi_pad_kv"),
                             window_size, head_dim)
    scale = _checks.check_scale(scale, head_dim ** -0.5)
    like = arrays.get("hi_qkv", arrays.get("lo_q"))
    return [arrays.get(n) for n in ("hi_qkv", "lo_q", "lo_kv", "hi_pad_kv")], dims, scale, like


def _opt_buf(a):
    return (0, 0) if a is None else _buf(a)


def hilo_attention(hi_qkv, lo_q, lo_kv, window_size, head_dim, scale=None, hi_pad_kv=None, return_lse=False):
    """HiLo attention on ``[B, H, W, C]`` projection outputs; see :func:`fastattn.hilo_attention`.
    Returns ``(hi_out, lo_out)`` (None for an absent branch), with ``lo_lse`` third when
    ``return_lse``."""
    (hi, lq, lkv, pad), dims, scale, like = _hilo_args(hi_qkv, lo_q, lo_kv, hi_pad_kv, window_size, head_dim, scale)
    _checks.check_bool("return_lse", return_lse)
    b, h, w, _, hd, nh, nl = dims
    hi_out = np.empty((b, h, w, nh * hd), dtype=like.dtype)
    lo_out = np.empty((b, h, w, nl * hd), dtype=like.dtype)
    lse = np.empty((b, h * w, nl), dtype=_acc(like.dtype))
    if like.size:
        lib.hilo_forward(like.dtype.name, dims, scale, num_threads(), _opt_buf(hi), None if pad is None else _buf(pad),
                         _opt_buf(lq), _opt_buf(lkv), _buf(hi_out), _buf(lo_out), _buf(lse))
    hi_out = hi_out if hi is not None else None
    lo_out, lse = (lo_out, lse) if lq is not None else (None, None)
    return (hi_out, lo_out, lse) if return_lse else (hi_out, lo_out)


def hilo_attention_backward(d_hi_out, d_lo_out, hi_qkv, lo_q, lo_kv, lo_out, lo_lse, window_size, head_dim,
                            scale=None, hi_pad_kv=None):
    """Gradients ``(d_hi_qkv, d_lo_q, d_lo_kv, d_hi_pad_kv)`` of :func:`hilo_attention` given
    the upstream gradients and the forward's ``lo_out`` and ``lo_lse`` (``return_lse=True``);
    None where the input was None (``d_hi_out``, ``d_lo_out``, ``lo_out`` and ``lo_lse`` are
    None for an absent branch)."""
    (hi, lq, lkv, pad), dims, scale, like = _hilo_args(hi_qkv, lo_q, lo_kv, hi_pad_kv, window_size, head_dim, scale)
    b, h, w, _, hd, nh, nl = dims
    empty = np.empty((0,), dtype=like.dtype)

    def given(name, a, shape, dtype, present):
        if not present:
            if a is not None:
                raise ValueError(f"{name} must be None for an absent branch")
            return empty if dtype == like.dtype else np.empty((0,), dtype=dtype)
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype:
            raise ValueError(f"{name} must be a {np.dtype(dtype).name} array of shape {shape}")
        return np.ascontiguousarray(a)

    d_hi = given("d_hi_out", d_hi_out, (b, h, w, nh * hd), like.dtype, hi is not None)
    d_lo = given("d_lo_out", d_lo_out, (b, h, w, nl * hd), like.dtype, lq is not None)
    lo_out = given("lo_out", lo_out, (b, h, w, nl * hd), like.dtype, lq is not None)
    lse = given("lo_lse", lo_lse, (b, h * w, nl), _acc(like.dtype), lq is not None)
    grads = [empty if a is None else np.empty_like(a) for a in (hi, pad, lq, lkv)]
    if like.size:
        lib.hilo_backward(like.dtype.name, dims, scale, num_threads(), _opt_buf(hi), None if pad is None else _buf(pad),
                          _opt_buf(lq), _opt_buf(lkv), _buf(lo_out), _buf(lse), _buf(d_hi), _buf(d_lo),
                          *map(_buf, grads))
    else:
        for g in grads:
            g.fill(0)
    d_hi_qkv, d_pad, d_lq, d_lkv = (g if a is not None else None for g, a in zip(grads, (hi, pad, lq, lkv)))
    return d_hi_qkv, d_lq, d_lkv, d_pad


# --- landmark ----------------------------------------------------------------------------------


def landmark_attention(q, k, v, block_size=64, scale=None, return_lse=False):
    """Landmark attention's grouped softmax on ``[B, T, H, D]`` arrays; see
    :func:`fastattn.landmark_attention`."""
    from .landmark import landmark_dims

    q, k, v = _arrays(q=q, k=k, v=v)
    dims = landmark_dims(q.shape, k.shape, v.shape, block_size)
    _checks.check_bool("return_lse", return_lse)
    scale = _checks.check_scale(scale, q.shape[-1] ** -0.5)
    b, tq, _, hq, _, _, dv, _ = dims
    out = np.empty((b, tq, hq, dv), dtype=q.dtype)
    lse = np.empty((b, tq, hq), dtype=_acc(q.dtype))
    if out.size:
        lib.landmark_forward(q.dtype.name, dims, scale, num_threads(), _buf(q), _buf(k), _buf(v), _buf(out), _buf(lse))
    return (out, lse) if return_lse else out


def landmark_attention_backward(dout, q, k, v, out, lse, block_size=64, scale=None):
    """Gradients ``(dq, dk, dv)`` of :func:`landmark_attention` given the upstream gradient
    ``dout`` and the forward's ``out`` and ``lse`` (``return_lse=True``)."""
    from .landmark import landmark_dims

    dout, q, k, v, out = _arrays(dout=dout, q=q, k=k, v=v, out=out)
    dims = landmark_dims(q.shape, k.shape, v.shape, block_size)
    b, tq, _, hq, _, _, dv, _ = dims
    lse = _saved_rows(out, dout, lse, (b, tq, hq, dv), q.dtype)
    scale = _checks.check_scale(scale, q.shape[-1] ** -0.5)
    dq, dk, dv_ = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    lib.landmark_backward(
        q.dtype.name, dims, scale, num_threads(),
        _buf(q), _buf(k), _buf(v), _buf(out), _buf(dout), _buf(lse), _buf(dq), _buf(dk), _buf(dv_),
    )
    return dq, dk, dv_


def landmark_retrieval_attention(q, k_cache, v_cache, block_size, top_k, scale=None, selection="per_token_and_head",
                                 return_indices=False):
    """Landmark retrieval for inference on ``[B, T, H, D]`` arrays; see
    :func:`fastattn.landmark_retrieval_attention` (indices int64 ``[B, H, Tq, top_k]``)."""
    from .landmark import retrieval_dims

    q, k_cache, v_cache = _arrays(q=q, k_cache=k_cache, v_cache=v_cache)
    dims = retrieval_dims(q.shape, k_cache.shape, v_cache.shape, block_size, top_k, selection, return_indices)
    b, tq, tk, hq, hkv, d, dv = dims
    scale = _checks.check_scale(scale, d ** -0.5)
    out = np.empty((b, tq, hq, dv), dtype=q.dtype)
    kept = np.empty((b, hq, tq, top_k), dtype=np.int64)
    if out.size:
        lib.landmark_retrieval(q.dtype.name, (b, tq, tk, hq, hkv, d, dv, block_size), scale, top_k, selection,
                               num_threads(), _buf(q), _buf(k_cache), _buf(v_cache), _buf(out), _buf(kept))
    return (out, kept) if return_indices else out
