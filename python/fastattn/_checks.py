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
    if not isinstance(value, bool):
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
