"""The ops on numpy arrays, calling the Rust kernels directly (no torch tensors involved).

float32, float64 and float16 arrays (numpy has no bfloat16); all inputs of a call share one
dtype. Results are new C-contiguous arrays. Semantics match the torch functions of the same
name (see their docstrings).
"""

from __future__ import annotations

import numpy as np

from . import _checks
from ._native import lib, num_threads

__all__ = ["attention", "attention_backward"]

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
    if out.shape != (b, tq, hq, dv):
        raise ValueError(f"out must have shape {(b, tq, hq, dv)}, got {out.shape}")
    if dout.shape != out.shape:
        raise ValueError(f"dout must have shape {out.shape}, got {dout.shape}")
    if not isinstance(lse, np.ndarray) or lse.shape != (b, tq, hq) or lse.dtype != _acc(q.dtype):
        raise ValueError(f"lse must be a {_acc(q.dtype).name} array of shape {(b, tq, hq)}")
    lse = np.ascontiguousarray(lse)
    _checks.check_bool("is_causal", is_causal)
    scale = _checks.check_scale(scale, q.shape[-1] ** -0.5 if q.shape[-1] else 1.0)
    dq, dk, dv_ = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    lib.attention_backward(
        q.dtype.name, dims, scale, is_causal, num_threads(),
        _buf(q), _buf(k), _buf(v), _buf(out), _buf(dout), _buf(lse), _buf(dq), _buf(dk), _buf(dv_),
    )
    return dq, dk, dv_
