"""Linear attention with flash-linear-attention semantics (docs/linear.md), plus non-causal mode and
built-in feature maps.

``linear_attention(q, k, v, scale=None, initial_state=None, output_final_state=False,
normalize=True, cu_seqlens=None, *, causal=True, feature_map=None)`` → ``(o, final_state)``,
a drop-in for fla's ``chunk_linear_attn`` with its defaults. Per sequence and head, with
``φ`` the feature map (identity by default, as fla: the caller maps q and k)::

    o_t = scale φ(q_t) · (S0 + Σ_{j≤t} φ(k_j) v_jᵀ)
    normalize: o_t /= scale φ(q_t) · (z0 + Σ_{j≤t} φ(k_j)) + 1e-10

Choices where fla is silent or odd, matched or documented here:

* State with ``normalize=True`` is the pair ``(kv [N, H, K, V], z [N, 1, H, K])`` both ways.
  As fla, a plain tensor ``initial_state`` is the kv state (z starts at 0), and the returned
  pair always carries ``z`` (``(None, z)`` when ``output_final_state=False``), since decode
  needs it. With ``normalize=False`` the state is the kv tensor alone.
* States are float32 (float64 for float64 inputs) whatever the input dtype: the kv state as
  fla's, and z too (fla returns z in the input dtype; float32 keeps the 1e-10 epsilon and the
  running key sum meaningful for half inputs). Initial states of any float dtype are cast.
* ``causal=False`` sums over the whole sequence (each ``cu_seqlens`` segment); it takes no
  ``initial_state`` and returns ``(o, None)``.
* ``feature_map``: ``None``/``"identity"``, ``"elu1"`` (``elu(x) + 1``) or ``"relu"``,
  applied to q and k inside the kernel in float32, so ``elu+1`` of a very negative bf16 input
  does not round to 0 before it is used.
* Empty ``cu_seqlens`` segments keep their initial state.

Torch ops: ``fastattn::linear_attention_fwd`` → ``(o, final_kv, final_z)`` and
``fastattn::linear_attention_bwd`` → ``(dq, dk, dv, d_initial_kv, d_initial_z)`` (empty
tensors where there is no initial state). Autograd is registered on the forward, through
the states too (double backward is not supported).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks
from ._native import lib, num_threads
from ._torch import acc_dtype, buf, check_tensors, direct, dtype_name, no_cuda_kernel

__all__ = ["linear_attention", "LinearAttentionFunction", "FEATURE_MAPS"]

FEATURE_MAPS = ("identity", "elu1", "relu")


def _n_seqs(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _empty(q: Tensor) -> Tensor:
    return q.new_empty((0,), dtype=acc_dtype(q.dtype))


def _opt(t: Optional[Tensor]):
    return None if t is None else buf(t)


def _dims(q: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    b, t, h, k = q.shape
    return b, t, h, k, v.shape[-1]


@torch.library.custom_op("fastattn::linear_attention_fwd", mutates_args=(), device_types="cpu")
def linear_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_kv: Optional[Tensor],
    initial_z: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    scale: float,
    normalize: bool,
    causal: bool,
    feature_map: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_cpu(q, k, v, initial_kv, initial_z, cu_seqlens, scale, normalize, causal, feature_map)


def _forward_cpu(q, k, v, initial_kv, initial_z, cu_seqlens, scale, normalize, causal, feature_map):
    """The CPU kernel; shapes as the public function validates them."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    acc = acc_dtype(q.dtype)
    if initial_kv is not None:
        initial_kv = initial_kv.to(acc).contiguous()
    if initial_z is not None:
        initial_z = initial_z.to(acc).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
    b, t, h, kd, vd = _dims(q, v)
    n = _n_seqs(q, cu_seqlens)
    out = q.new_empty((b, t, h, vd))
    final_kv = q.new_empty((n, h, kd, vd), dtype=acc)
    final_z = q.new_empty((n, 1, h, kd), dtype=acc)
    lib.linear_attention_forward(
        dtype_name(q.dtype), (b, t, h, kd, vd), scale, causal, normalize, feature_map, num_threads(),
        buf(q), buf(k), buf(v), _opt(initial_kv), _opt(initial_z), _opt(cu_seqlens),
        buf(out), buf(final_kv), buf(final_z),
    )
    return out, final_kv, final_z


@linear_attention_fwd.register_fake
def _(q, k, v, initial_kv, initial_z, cu_seqlens, scale, normalize, causal, feature_map):
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    n = _n_seqs(q, cu_seqlens)
    acc = acc_dtype(q.dtype)
    return (
        q.new_empty((b, t, h, vd)),
        q.new_empty((n, h, kd, vd), dtype=acc),
        q.new_empty((n, 1, h, kd), dtype=acc),
    )


linear_attention_fwd.register_kernel("cuda")(no_cuda_kernel("linear_attention_fwd"))


@torch.library.custom_op("fastattn::linear_attention_bwd", mutates_args=(), device_types="cpu")
def linear_attention_bwd(
    dout: Tensor,
    d_final_kv: Optional[Tensor],
    d_final_z: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_kv: Optional[Tensor],
    initial_z: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    scale: float,
    normalize: bool,
    causal: bool,
    feature_map: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    acc = acc_dtype(q.dtype)
    if initial_kv is not None:
        initial_kv = initial_kv.to(acc).contiguous()
    if initial_z is not None:
        initial_z = initial_z.to(acc).contiguous()
    if d_final_kv is not None:
        d_final_kv = d_final_kv.to(acc).contiguous()
    if d_final_z is not None:
        d_final_z = d_final_z.to(acc).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_kv0 = torch.empty_like(initial_kv) if initial_kv is not None else _empty(q)
    d_z0 = torch.empty_like(initial_z) if initial_z is not None else _empty(q)
    lib.linear_attention_backward(
        dtype_name(q.dtype), _dims(q, v), scale, causal, normalize, feature_map, num_threads(),
        buf(q), buf(k), buf(v), _opt(initial_kv), _opt(initial_z), _opt(cu_seqlens),
        buf(dout), _opt(d_final_kv), _opt(d_final_z),
        buf(dq), buf(dk), buf(dv), buf(d_kv0), buf(d_z0),
    )
    return dq, dk, dv, d_kv0, d_z0


@linear_attention_bwd.register_fake
def _(dout, d_final_kv, d_final_z, q, k, v, initial_kv, initial_z, cu_seqlens, scale, normalize, causal, feature_map):
    acc = acc_dtype(q.dtype)
    d_kv0 = q.new_empty(initial_kv.shape, dtype=acc) if initial_kv is not None else _empty(q)
    d_z0 = q.new_empty(initial_z.shape, dtype=acc) if initial_z is not None else _empty(q)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), d_kv0, d_z0


linear_attention_bwd.register_kernel("cuda")(no_cuda_kernel("linear_attention_bwd"))


def _setup_context(ctx, inputs, output):
    q, k, v, initial_kv, initial_z, cu_seqlens, scale, normalize, causal, feature_map = inputs
    ctx.save_for_backward(q, k, v, initial_kv, initial_z, cu_seqlens)
    ctx.opts = (scale, normalize, causal, feature_map)


def _backward(ctx, dout, d_final_kv, d_final_z):
    q, k, v, initial_kv, initial_z, cu_seqlens = ctx.saved_tensors
    scale, normalize, causal, feature_map = ctx.opts
    if dout is None:
        dout = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    dq, dk, dv, d_kv0, d_z0 = torch.ops.fastattn.linear_attention_bwd(
        dout, d_final_kv, d_final_z, q, k, v, initial_kv, initial_z, cu_seqlens,
        scale, normalize, causal, feature_map,
    )
    return (
        dq, dk, dv,
        d_kv0 if initial_kv is not None else None,
        d_z0 if initial_z is not None else None,
        None, None, None, None, None,
    )


linear_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- validation -------------------------------------------------------------------------


def _check_feature_map(feature_map) -> str:
    if feature_map is None:
        return "identity"
    if not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be None or one of {', '.join(map(repr, FEATURE_MAPS))}, got {feature_map!r}")
    return feature_map


def _check_cu_seqlens(cu_seqlens, q: Tensor) -> Optional[Tensor]:
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {dtype_name(cu_seqlens.dtype)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (flatten the sequences), but q has batch size {q.shape[0]}")
    if not torch.compiler.is_compiling() and cu_seqlens.device.type != "meta":
        vals = cu_seqlens.tolist()
        if vals[0] != 0 or vals[-1] != q.shape[1]:
            raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {q.shape[1]}, got {vals[0]}..{vals[-1]}")
        if any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError("cu_seqlens must be sorted (non-decreasing)")
    return cu_seqlens


def _check_state(name: str, s, shape: tuple, q: Tensor) -> Optional[Tensor]:
    if s is None:
        return None
    if not isinstance(s, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    _checks.check_dtype(name, dtype_name(s.dtype))
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(s.shape)}")
    if s.device != q.device:
        raise ValueError(f"{name} is on {s.device} but q is on {q.device}")
    return s.to(acc_dtype(q.dtype))


_STATE_NAMES = ("initial_state", "initial_state[0] (kv)", "initial_state[1] (z)")


def _prepare(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, causal, feature_map,
             state_names=_STATE_NAMES):
    """Validates the call; returns ``(scale, kv0, z0, cu_seqlens, feature_map)``. ``state_names``:
    what the messages call the kv state alone, the kv of a pair and the z of a pair."""
    check_tensors(q=q, k=k, v=v)
    layout = "[batch, seqlen, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, t.shape, 4, layout)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"v must be [batch, seqlen, heads, v_head_dim] matching q's first three dims {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got q {q.shape[-1]}, v {v.shape[-1]}")
    _checks.check_bool("output_final_state", output_final_state)
    _checks.check_bool("normalize", normalize)
    _checks.check_bool("causal", causal)
    feature_map = _check_feature_map(feature_map)
    scale = _checks.check_scale(scale, q.shape[-1] ** -0.5)
    cu_seqlens = _check_cu_seqlens(cu_seqlens, q)
    if isinstance(initial_state, (tuple, list)):
        if not normalize:
            raise TypeError("initial_state is a (kv, z) pair, which needs normalize=True; pass the kv tensor alone")
        if len(initial_state) != 2:
            raise ValueError(f"initial_state must be a (kv, z) pair, got {len(initial_state)} items")
        kv0, z0 = initial_state
    else:
        kv0, z0 = initial_state, None
    if not causal and (kv0 is not None or z0 is not None):
        raise ValueError("initial_state is only defined for causal=True")
    if not causal and output_final_state:
        raise ValueError("output_final_state is only defined for causal=True")
    n = _n_seqs(q, cu_seqlens)
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    kv0 = _check_state(state_names[0] if z0 is None else state_names[1], kv0, (n, h, kd, vd), q)
    z0 = _check_state(state_names[2], z0, (n, 1, h, kd), q)
    return scale, kv0, z0, cu_seqlens, feature_map


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: Tensor | None = None,
    *,
    causal: bool = True,
    feature_map: str | None = None,
):
    """Linear attention (fla ``chunk_linear_attn`` semantics, see the module docstring).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; one float dtype (half types accumulate
            in float32).
        scale: default ``K ** -0.5``.
        initial_state: kv ``[N, H, K, V]``, or with ``normalize`` the pair ``(kv, z)`` with
            z ``[N, 1, H, K]`` (either may be None). ``N = B``, or ``len(cu_seqlens) - 1``.
        output_final_state: return the kv state after each sequence.
        normalize: divide by the running normaliser (``+ 1e-10``).
        cu_seqlens: int ``[N + 1]`` offsets packing N sequences into ``B = 1``.
        causal: False for bidirectional (no state).
        feature_map: None/"identity", "elu1" or "relu", applied to q and k in the kernel.

    Returns ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in q's dtype; ``final_state`` as fla
    (``(kv or None, z)`` when normalizing, else kv or None; None when not causal).
    Differentiable in q, k, v and the initial states.
    """
    scale, kv0, z0, cu_seqlens, feature_map = _prepare(
        q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, causal, feature_map
    )
    if direct(q, k, v, kv0, z0):
        o, kv, z = _forward_cpu(q, k, v, kv0, z0, cu_seqlens, scale, normalize, causal, feature_map)
    else:
        o, kv, z = torch.ops.fastattn.linear_attention_fwd(q, k, v, kv0, z0, cu_seqlens, scale, normalize, causal,
                                                           feature_map)
    if not causal:
        return o, None
    kv = kv if output_final_state else None
    if normalize:
        return o, (kv, z)
    return o, kv


class LinearAttentionFunction(torch.autograd.Function):
    """``torch.autograd.Function`` drop-in: ``LinearAttentionFunction.apply(q, k, v,
    scale=None, initial_kv=None, initial_z=None, normalize=True, cu_seqlens=None, causal=True,
    feature_map=None)`` → ``(o, final_kv, final_z)`` (states always returned, float32 or
    float64); forward and backward call the ``fastattn::linear_attention_*`` ops."""

    @staticmethod
    def forward(ctx, q, k, v, scale=None, initial_kv=None, initial_z=None, normalize=True, cu_seqlens=None,
                causal=True, feature_map=None):
        state = None if initial_kv is None and initial_z is None else (
            (initial_kv, initial_z) if normalize else initial_kv
        )
        if not normalize and initial_z is not None:
            raise ValueError("initial_z needs normalize=True")
        scale, kv0, z0, cu, fm = _prepare(q, k, v, scale, state, False, normalize, cu_seqlens, causal, feature_map,
                                          ("initial_kv", "initial_kv", "initial_z"))
        o, kv, z = torch.ops.fastattn.linear_attention_fwd(q, k, v, kv0, z0, cu, scale, normalize, causal, fm)
        ctx.save_for_backward(q, k, v, kv0, z0, cu)
        ctx.opts = (scale, normalize, causal, fm)
        ctx.state_dtypes = (None if initial_kv is None else initial_kv.dtype, None if initial_z is None else initial_z.dtype)
        return o, kv, z

    @staticmethod
    def backward(ctx, dout, d_kv, d_z):
        q, k, v, kv0, z0, cu = ctx.saved_tensors
        scale, normalize, causal, fm = ctx.opts
        dq, dk, dv, d_kv0, d_z0 = torch.ops.fastattn.linear_attention_bwd(
            dout, d_kv, d_z, q, k, v, kv0, z0, cu, scale, normalize, causal, fm
        )
        kv_dt, z_dt = ctx.state_dtypes
        return (
            dq, dk, dv, None,
            d_kv0.to(kv_dt) if kv_dt is not None else None,
            d_z0.to(z_dt) if z_dt is not None else None,
            None, None, None, None,
        )
