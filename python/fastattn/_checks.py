"""Argument validation shared by the torch and numpy front-ends.

Everything a kernel relies on is checked here, in Python, with an error that names the
offending argument; the Rust side re-checks buffer lengths only as a last line of defence.
"""

from __future__ import annotations

from collections.abc import Sequence

FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16")


def check_rank(name: str, shape: Sequence[int], rank: int, layout: str) -> None:
    if len(shape) != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(shape)}")


def check_dtype(name: str, dtype: str, allowed: Sequence[str] = FLOAT_DTYPES) -> None:
    if dtype not in allowed:
        raise TypeError(f"{name} has dtype {dtype}; fastattn supports {', '.join(allowed)}")


def check_same_dtype(names_dtypes: Sequence[tuple[str, str]]) -> None:
    first_name, first = names_dtypes[0]
    for name, dt in names_dtypes[1:]:
        if dt != first:
            raise TypeError(f"{name} has dtype {dt} but {first_name} has {first}; they must match")


def check_scale(scale, default: float) -> float:
    if scale is None:
        return default
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def check_bool(name: str, value) -> bool:
    if value is not True and value is not False:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def attention_dims(
    q_shape, k_shape, v_shape, names: tuple[str, str, str] = ("q", "k", "v")
) -> tuple[int, int, int, int, int, int, int]:
    """Validates dense-attention shapes and returns
    ``(batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim)``."""
    layout = "[batch, seqlen, heads, head_dim]"
    nq, nk, nv = names
    check_rank(nq, q_shape, 4, layout)
    check_rank(nk, k_shape, 4, layout)
    check_rank(nv, v_shape, 4, layout)
    b, tq, hq, d = q_shape
    bk, tk, hkv, dk = k_shape
    bv, tv, hv, dv = v_shape
    if bk != b or bv != b:
        raise ValueError(f"batch sizes differ: {nq} {b}, {nk} {bk}, {nv} {bv}")
    if tv != tk:
        raise ValueError(f"{nk} and {nv} sequence lengths differ: {nk} {tk}, {nv} {tv}")
    if hv != hkv:
        raise ValueError(f"{nk} and {nv} head counts differ: {nk} {hkv}, {nv} {hv}")
    if dk != d:
        raise ValueError(f"{nk} head_dim {dk} differs from {nq} head_dim {d}")
    if hkv == 0 and hq != 0:
        raise ValueError(f"{nk} has 0 heads but {nq} has {hq}")
    if hkv and hq % hkv != 0:
        raise ValueError(
            f"{nq} heads ({hq}) must be a multiple of {nk}/{nv} heads ({hkv}) for GQA/MQA"
        )
    return b, tq, tk, hq, hkv, d, dv


def _per_dim(name, value, rank, kind=int):
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name} has {len(value)} entries but the input has {rank} spatial dims")
        values = tuple(value)
    else:
        values = (value,) * rank
    for x in values:
        if kind is bool and not isinstance(x, bool):
            raise ValueError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        if kind is int and (isinstance(x, bool) or not isinstance(x, int)):
            raise ValueError(f"{name} must be an int or a tuple of ints, got {value!r}")
    return values


def na_arguments(spatial_shape, kernel_size, stride=1, dilation=1, is_causal=False):
    """Normalises neighborhood-attention window arguments to per-dimension tuples
    ``(kernel_size, stride, dilation, is_causal)``; raises ValueError, naming the argument,
    for what NATTEN rejects (docs/neighborhood.md)."""
    rank = len(spatial_shape)
    ks = _per_dim("kernel_size", kernel_size, rank)
    ss = _per_dim("stride", stride, rank)
    ds = _per_dim("dilation", dilation, rank)
    cs = _per_dim("is_causal", is_causal, rank, bool)
    for dim, (length, k, s, d) in enumerate(zip(spatial_shape, ks, ss, ds)):
        if k < 2:
            raise ValueError(f"kernel_size must be >= 2, got {k} on dim {dim}")
        if d < 1:
            raise ValueError(f"dilation must be >= 1, got {d} on dim {dim}")
        if s < 1 or s > k:
            raise ValueError(f"stride must be in [1, kernel_size], got {s} (kernel_size {k}) on dim {dim}")
        if k * d > length:
            raise ValueError(
                f"kernel_size * dilation ({k} * {d}) exceeds the input size {length} on dim {dim}"
            )
    return ks, ss, ds, cs


def na_dims(q_shape, k_shape, v_shape, ak_shape=None, av_shape=None, rank=None):
    """Validates neighborhood-attention shapes (``[B, *spatial, H, D]``, 1-3 spatial dims,
    optional additional keys/values ``[B, n, H_kv, D]`` / ``[B, n, H_kv, Dv]``) and returns
    ``(batch, spatial, q_heads, kv_heads, head_dim, v_head_dim, n_additional)``."""
    layout = "[batch, *spatial, heads, head_dim]"
    if rank is not None and len(q_shape) != rank + 3:
        raise ValueError(
            f"query must be {rank + 3}-D [batch, {rank} spatial dims, heads, head_dim], got shape {tuple(q_shape)}"
        )
    if not 4 <= len(q_shape) <= 6:
        raise ValueError(f"query must be {layout} with 1-3 spatial dims, got shape {tuple(q_shape)}")
    for name, shape in (("key", k_shape), ("value", v_shape)):
        if len(shape) != len(q_shape):
            raise ValueError(f"{name} must have the rank of query ({len(q_shape)}), got shape {tuple(shape)}")
        if tuple(shape[:-2]) != tuple(q_shape[:-2]):
            raise ValueError(
                f"{name} batch/spatial shape {tuple(shape[:-2])} differs from query's {tuple(q_shape[:-2])}"
            )
    b, *spatial, hq, d = q_shape
    hkv, dk = k_shape[-2:]
    hv, dv = v_shape[-2:]
    if dk != d:
        raise ValueError(f"key head_dim {dk} differs from query head_dim {d}")
    if hv != hkv:
        raise ValueError(f"key and value head counts differ: key {hkv}, value {hv}")
    if d == 0 or dv == 0:
        raise ValueError(f"head dims must be positive, got query/key {d}, value {dv}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of key/value heads ({hkv})")
    n_add = 0
    if (ak_shape is None) != (av_shape is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if ak_shape is not None:
        for name, shape, hd, like in (("additional_keys", ak_shape, d, "key"),
                                      ("additional_values", av_shape, dv, "value")):
            if len(shape) != 4 or shape[0] != b or shape[2] != hkv or shape[3] != hd:
                raise ValueError(
                    f"{name} must be [batch, n, kv_heads, head_dim] = [{b}, n, {hkv}, {hd}] to match {like}, "
                    f"got {tuple(shape)}"
                )
        if ak_shape[1] != av_shape[1]:
            raise ValueError(
                f"additional_keys and additional_values lengths differ: {ak_shape[1]} vs {av_shape[1]}"
            )
        n_add = ak_shape[1]
    return b, list(spatial), hq, hkv, d, dv, n_add


def na_inputs(query, key, value, additional_keys, additional_values) -> dict:
    """The inputs of a neighborhood-attention call by name, additional ones only if given."""
    named = {"query": query, "key": key, "value": value}
    if additional_keys is not None:
        named["additional_keys"] = additional_keys
    if additional_values is not None:
        named["additional_values"] = additional_values
    return named


def na_call(named: dict, kernel_size, stride, dilation, is_causal, scale, rank=None):
    """Validates a neighborhood-attention call whose inputs (from :func:`na_inputs`) have
    passed the dtype checks; returns the kernel's dims (see :func:`na_dims`) and window
    parameters ``(kernel_size, stride, dilation, is_causal, scale)``."""
    shape = lambda name: None if name not in named else tuple(named[name].shape)  # noqa: E731
    dims = na_dims(shape("query"), shape("key"), shape("value"), shape("additional_keys"),
                   shape("additional_values"), rank=rank)
    ks, ss, ds, cs = na_arguments(dims[1], kernel_size, stride, dilation, is_causal)
    return dims, (list(ks), list(ss), list(ds), list(cs), check_scale(scale, dims[4] ** -0.5))


HILO_MAX_WINDOW = 8  # the Rust kernels compute a window's ws² × ws² scores whole


def check_window_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= HILO_MAX_WINDOW:
        raise ValueError(f"window_size must be an int in [1, {HILO_MAX_WINDOW}], got {value!r}")
    return value


def hilo_dims(hi_shape, lo_q_shape, lo_kv_shape, pad_shape, window_size, head_dim):
    """Validates a HiLo call at the attention boundary (docs/hilo.md): ``hi_qkv`` ``[B, H, W,
    3·h_dim]``, ``lo_q`` ``[B, H, W, l_dim]``, ``lo_kv`` ``[B, ceil(H/ws), ceil(W/ws), 2·l_dim]``
    (either branch may be absent: shape None), ``hi_pad_kv`` ``[2·h_dim]``. Returns the
    kernel's ``(batch, height, width, window, head_dim, hi_heads, lo_heads)``."""
    ws = check_window_size(window_size)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if hi_shape is None and lo_q_shape is None:
        raise ValueError("hi_qkv and lo_q are both None: at least one branch must be given")
    if (lo_q_shape is None) != (lo_kv_shape is None):
        raise ValueError("lo_q and lo_kv must be given together")
    layout = "[batch, height, width, channels]"
    hi_heads = lo_heads = 0
    map_shape = None
    if hi_shape is not None:
        check_rank("hi_qkv", hi_shape, 4, layout)
        map_shape, c = tuple(hi_shape[:3]), hi_shape[3]
        if c == 0 or c % (3 * head_dim):
            raise ValueError(f"hi_qkv has {c} channels, not a positive multiple of 3 * head_dim = {3 * head_dim} "
                             "(pass None for a branch without heads)")
        hi_heads = c // (3 * head_dim)
    if lo_q_shape is not None:
        check_rank("lo_q", lo_q_shape, 4, layout)
        check_rank("lo_kv", lo_kv_shape, 4, "[batch, ceil(height / ws), ceil(width / ws), 2 * l_dim]")
        if map_shape is not None and tuple(lo_q_shape[:3]) != map_shape:
            raise ValueError(f"lo_q batch/map shape {tuple(lo_q_shape[:3])} differs from hi_qkv's {map_shape}")
        map_shape = tuple(lo_q_shape[:3])
        c = lo_q_shape[3]
        if c == 0 or c % head_dim:
            raise ValueError(f"lo_q has {c} channels, not a positive multiple of head_dim = {head_dim} "
                             "(pass None for a branch without heads)")
        lo_heads = c // head_dim
        b, h, w = map_shape
        pooled = (b, -(-h // ws), -(-w // ws), 2 * c)
        if tuple(lo_kv_shape) != pooled:
            raise ValueError(f"lo_kv must be [batch, ceil(H/ws), ceil(W/ws), 2 * l_dim] = {pooled}, "
                             f"got {tuple(lo_kv_shape)}")
    b, h, w = map_shape
    if pad_shape is not None:
        if hi_shape is None:
            raise ValueError("hi_pad_kv is given without hi_qkv")
        if tuple(pad_shape) != (2 * hi_heads * head_dim,):
            raise ValueError(f"hi_pad_kv must be [2 * h_dim] = [{2 * hi_heads * head_dim}], got {tuple(pad_shape)}")
    return b, h, w, ws, head_dim, hi_heads, lo_heads
