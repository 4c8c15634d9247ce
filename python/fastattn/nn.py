"""``nn.Module`` layers built on fastattn's ops.

* :class:`FlowAttention` / :class:`FlowAttentionCausal`: Flowformer's ``Flow_Attention`` /
  ``Flow_Attention_Causal`` with the same constructor, parameter names and ``forward(queries,
  keys, values)`` on ``[B, L or S, d_input]`` inputs, so their ``state_dict`` loads as is and
  gives the same output (dropout after the output projection only).
* :class:`HiLo`: LITv2's ``HiLo`` with its constructor, attributes and ``h_qkv`` / ``h_proj``
  / ``l_q`` / ``l_kv`` / ``l_proj`` layers, ``forward(x, H, W)``; maps whose sides are not
  multiples of the window size run LITv2's padded form (docs/hilo.md).
* :class:`LinearAttention`: projections + feature map + :func:`fastattn.linear_attention`.
* :class:`NeighborhoodAttention1D` / ``2D`` / ``3D``: NATTEN's modules of the same names, with
  its constructor and its ``qkv`` / ``proj`` layers, so a NATTEN ``state_dict`` loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .flow import flow_attention
from .hilo import _attention_over_inputs as _hilo_over_inputs
from .hilo import hilo_attention
from . import _checks
from ._torch import plain_eager
from .linear import FEATURE_MAPS, linear_attention
from .neighborhood import neighborhood_attention

__all__ = [
    "FlowAttention",
    "FlowAttentionCausal",
    "HiLo",
    "LinearAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
]


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _input(module: nn.Module, name: str, x, layout: str, channels: int) -> None:
    """A module's input: a floating tensor of the layout's rank with ``channels`` last."""
    rank = layout.count(",") + 1
    who = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: {name} has dtype {x.dtype}; expected a floating dtype")
    if x.dim() != rank:
        raise ValueError(f"{who}: {name} must be {layout} (rank {rank}), got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        raise ValueError(f"{who}: {name} has {x.shape[-1]} channels but the layer takes {channels}")


class _FlowBase(nn.Module):
    causal = False

    def __init__(self, d_input, d_model, d_output, n_heads, drop_out=0.05, eps=1e-6):
        super().__init__()
        _positive("n_heads", n_heads)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads, self.d_input = n_heads, d_input
        self.query_projection = nn.Linear(d_input, d_model)
        self.key_projection = nn.Linear(d_input, d_model)
        self.value_projection = nn.Linear(d_input, d_model)
        self.out_projection = nn.Linear(d_model, d_output)
        self.dropout = nn.Dropout(drop_out)
        self.eps = eps

    def forward(self, queries, keys, values):
        """``queries`` ``[B, L, d_input]``, ``keys``/``values`` ``[B, S, d_input]`` (not yet
        projected) → ``[B, L, d_output]``."""
        for name, x in (("queries", queries), ("keys", keys), ("values", values)):
            _input(self, name, x, "[B, L or S, d_input]", self.d_input)
        b, l, _ = queries.shape
        s = keys.shape[1]
        if keys.shape[0] != b or values.shape[0] != b:
            raise ValueError(f"keys and values must have the batch size of queries ({b}), got "
                             f"{keys.shape[0]} and {values.shape[0]}")
        if values.shape[1] != s:
            raise ValueError(f"values must have as many tokens as keys ({s}), got {values.shape[1]}")
        q = self.query_projection(queries).view(b, l, self.n_heads, -1)
        k = self.key_projection(keys).view(b, s, self.n_heads, -1)
        v = self.value_projection(values).view(b, s, self.n_heads, -1)
        x = flow_attention(q, k, v, causal=self.causal, eps=self.eps)
        return self.dropout(self.out_projection(x.reshape(b, l, -1)))


class FlowAttention(_FlowBase):
    """Flowformer's ``Flow_Attention`` (non-causal; ``S`` may differ from ``L``).

    ``FlowAttention(d_input, d_model, d_output, n_heads, drop_out=0.05, eps=1e-6)``; Linear
    layers ``query_projection``, ``key_projection``, ``value_projection`` (``d_input →
    d_model``) and ``out_projection`` (``d_model → d_output``), all with bias."""

    causal = False


class FlowAttentionCausal(_FlowBase):
    """Flowformer's ``Flow_Attention_Causal`` (needs ``S == L``); same constructor and
    parameters as :class:`FlowAttention`."""

    causal = True


def _project_into(hi, wh, bh, lo, wl, bl):
    """``cat(hi·whᵀ + bh, lo·wlᵀ + bl, -1)`` with both products written into one fresh
    buffer: no concatenation copy, one buffer instead of three."""
    nh, nl = wh.shape[0], wl.shape[0]
    y = hi.new_empty((*hi.shape[:-1], nh + nl))
    rows = y.view(-1, nh + nl)
    for x, w, b, out in ((hi, wh, bh, rows[:, :nh]), (lo, wl, bl, rows[:, nh:])):
        x = x.reshape(-1, x.shape[-1])
        if b is None:
            torch.mm(x, w.t(), out=out)
        else:
            torch.addmm(b, x, w.t(), out=out)
    return y


class _ProjectBoth(torch.autograd.Function):
    """:func:`_project_into` with its gradients: the output gradient's two column blocks are
    read in place (strided) by the weight and input GEMMs, where ``cat``'s backward would
    hand over the same views after the forward paid a concatenation copy of the output."""

    @staticmethod
    def forward(ctx, hi, lo, wh, bh, wl, bl):
        ctx.save_for_backward(hi, lo, wh, wl)
        return _project_into(hi, wh, bh, lo, wl, bl)

    @staticmethod
    def backward(ctx, dy):
        hi, lo, wh, wl = ctx.saved_tensors
        nh = wh.shape[0]
        rows = dy.reshape(-1, dy.shape[-1])
        dh, dl = rows[:, :nh], rows[:, nh:]
        need = ctx.needs_input_grad
        grads = [None] * 6
        for i, (x, w, d) in enumerate(((hi, wh, dh), (lo, wl, dl))):
            if need[i]:
                grads[i] = (d @ w).view(x.shape)
            if need[2 + 2 * i]:
                grads[2 + 2 * i] = d.t() @ x.reshape(-1, x.shape[-1])
            if need[3 + 2 * i]:
                grads[3 + 2 * i] = d.sum(0)
        return tuple(grads)


def _project_both(hi, h_proj: nn.Linear, lo, l_proj: nn.Linear):
    """``cat(h_proj(hi), l_proj(lo), -1)``. Plain eager CPU calls write both projections into
    one output instead (~10 ms of the 210 ms LITv2 paper layer in inference; in training
    also the concatenation's copy and fresh 38 MiB buffer), through :class:`_ProjectBoth`
    when a gradient is needed; compilation, modes, autocast and mixed dtypes take the plain
    form."""
    params = (h_proj.weight, h_proj.bias, l_proj.weight, l_proj.bias)
    if not plain_eager() or torch.is_autocast_enabled("cpu") or not hi.is_cpu or any(
        t is not None and (t.dtype != hi.dtype or type(t) is not torch.Tensor and not isinstance(t, nn.Parameter))
        for t in (lo, *params)
    ) or h_proj.weight is None or l_proj.weight is None:
        return torch.cat((h_proj(hi), l_proj(lo)), dim=-1)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hi, lo, *params)):
        return _ProjectBoth.apply(hi, lo, *params)
    return _project_into(hi, params[0], params[1], lo, params[2], params[3])


def _pool(x, ws):
    """The ``ws × ws`` average pool of the zero-padded map ``x`` ``[B, H, W, C]``: ceil mode
    with the full window as divisor counts the padding zeros, without padding the input."""
    if ws == 1:
        return x
    # Channels-last pooling is torch's fast path (1 ms at B64 14² 768; a strided mean 27).
    pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), ws, ws, ceil_mode=True, divisor_override=ws * ws)
    return pooled.permute(0, 2, 3, 1)


def _plain_linears(*layers) -> bool:
    """Plain ``nn.Linear`` layers that no hook watches (theirs or global): a route that
    skips their forward, or overwrites their outputs, cannot be told apart (a replaced
    layer may return a view of its input or a cached tensor)."""
    from torch.nn.modules import module as _m

    return not (_m._global_forward_hooks or _m._global_forward_pre_hooks) and all(
        type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks) for layer in layers
    )


class _ProjectInputs(torch.autograd.Function):
    """HiLo's three input projections ``h_qkv(x)``, ``l_q(x)``, ``l_kv(pool(x))`` with one
    backward that accumulates the input gradient in place: the second GEMM adds into the
    first one's result and the pool's gradient is added window offset by window offset.
    Autograd's own route allocates and zero-fills the pool's gradient and sums three
    full-size gradients into fresh buffers (38 MiB each at the paper's layer)."""

    @staticmethod
    def forward(ctx, x, ws, wh, bh, wq, bq, wkv, bkv):
        pooled = _pool(x, ws)
        ctx.save_for_backward(x, pooled, wh, wq, wkv)
        ctx.ws = ws
        return F.linear(x, wh, bh), F.linear(x, wq, bq), F.linear(pooled, wkv, bkv)

    @staticmethod
    def backward(ctx, d_h, d_q, d_kv):
        x, pooled, wh, wq, wkv = ctx.saved_tensors
        ws, need = ctx.ws, ctx.needs_input_grad
        grads = [None] * 8
        c = x.shape[-1]
        flat = []
        for i, (d, inp, w) in enumerate(((d_h, x, wh), (d_q, x, wq), (d_kv, pooled, wkv))):
            d = d.reshape(-1, w.shape[0])  # unused outputs come as zeros (materialised)
            flat.append(d)
            if need[2 + 2 * i]:
                grads[2 + 2 * i] = d.t() @ inp.reshape(-1, c)
            if need[3 + 2 * i]:
                grads[3 + 2 * i] = d.sum(0)
        if need[0]:
            dx = flat[0] @ wh
            dx.addmm_(flat[1], wq)
            dp = (flat[2] @ wkv).view(pooled.shape)
            dx = dx.view(x.shape)
            if ws == 1:
                dx.add_(dp)
            else:
                dp.mul_(1.0 / (ws * ws))
                H, W = x.shape[1], x.shape[2]
                for i in range(ws):
                    for j in range(ws):
                        rows, cols = len(range(i, H, ws)), len(range(j, W, ws))
                        dx[:, i::ws, j::ws].add_(dp[:, :rows, :cols])
            grads[0] = dx
        return tuple(grads)


class HiLo(nn.Module):
    """LITv2's HiLo attention on fastattn's kernels (docs/hilo.md).

    ``HiLo(dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
    window_size=2, alpha=0.5)``: ``l_heads = int(num_heads * alpha)`` Lo-Fi heads (all heads
    when ``window_size == 1``), the rest Hi-Fi; ``scale = qk_scale or head_dim ** -0.5``.
    Layers ``h_qkv`` (``dim → 3·h_dim``), ``h_proj`` (``h_dim → h_dim``), ``l_q`` (``dim →
    l_dim``), ``l_kv`` (``dim → 2·l_dim``), ``l_proj`` (``l_dim → l_dim``), each only when its
    branch has heads, so a LITv2 ``state_dict`` loads strictly. ``attn_drop`` and
    ``proj_drop`` are accepted and unused, as in LITv2. ``window_size`` is at most 8.

    ``forward(x, H, W)``: ``x`` ``[B, H·W, dim]`` → ``[B, H·W, dim]`` (Hi-Fi channels first).
    When ``H`` or ``W`` is not a multiple of ``window_size`` the map is zero-padded at the
    bottom/right, both branches run on the padded map and the output is cropped, as LITv2's
    detection and segmentation backbones do; the pad tokens' queries are never computed.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 window_size=2, alpha=0.5):
        super().__init__()
        _positive("dim", dim)
        _positive("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        _checks.check_window_size(window_size)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        head_dim = dim // num_heads
        self.dim, self.ws, self.head_dim = dim, window_size, head_dim
        self.l_heads = int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        if window_size == 1:  # LITv2: a 1×1 window is plain multi-head self-attention
            self.l_heads, self.h_heads = num_heads, 0
        self.l_dim, self.h_dim = self.l_heads * head_dim, self.h_heads * head_dim
        self.scale = qk_scale or head_dim**-0.5
        if self.l_heads > 0:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def _pooled(self, x):
        return _pool(x, self.ws)

    def _fused_inputs(self, x) -> bool:
        """Whether a training call takes :class:`_ProjectInputs`: both branches, a gradient
        to record, plain eager CPU, one dtype, no autocast and plain unhooked layers (their
        forward is not called)."""
        if not (self.h_heads and self.l_heads and torch.is_grad_enabled()) or not x.is_cpu:
            return False
        layers = (self.h_qkv, self.l_q, self.l_kv)
        params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
        if not (x.requires_grad or any(p.requires_grad for p in params)):
            return False
        return (
            plain_eager()
            and not torch.is_autocast_enabled("cpu")
            and type(x) is torch.Tensor
            and all(p.dtype == x.dtype and isinstance(p, nn.Parameter) for p in params)
            and _plain_linears(*layers)
        )

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        _input(self, "x", x, "[B, H*W, dim]", self.dim)
        _positive("H", H)
        _positive("W", W)
        b, n, c = x.shape
        if n != H * W:
            raise ValueError(f"HiLo: x has {n} tokens but H * W = {H} * {W} = {H * W}")
        x = x.reshape(b, H, W, c)
        hi_qkv = hi_pad = lo_q = lo_kv = None
        if self._fused_inputs(x):
            hi_qkv, lo_q, lo_kv = _ProjectInputs.apply(
                x, self.ws, self.h_qkv.weight, self.h_qkv.bias, self.l_q.weight, self.l_q.bias,
                self.l_kv.weight, self.l_kv.bias)
        else:
            if self.h_heads > 0:
                hi_qkv = self.h_qkv(x)
            if self.l_heads > 0:
                lo_q = self.l_q(x)
                lo_kv = self.l_kv(self._pooled(x))
        if self.h_heads > 0:
            bias = self.h_qkv.bias
            if bias is not None and (H % self.ws or W % self.ws):
                hi_pad = bias[self.h_dim:].to(hi_qkv.dtype)  # k | v of a zero pad token
        done = None
        # Inference overwrites the h_qkv / l_q outputs: only where nothing else can see them.
        if _plain_linears(*(layer for layer in (getattr(self, "h_qkv", None), getattr(self, "l_q", None)) if layer is not None)):
            done = _hilo_over_inputs(hi_qkv, lo_q, lo_kv, self.ws, self.head_dim, self.scale, hi_pad)
        if done is None:
            done = hilo_attention(hi_qkv, lo_q, lo_kv, self.ws, self.head_dim, self.scale, hi_pad_kv=hi_pad)
        hi, lo = done
        if hi is None:
            return self.l_proj(lo).reshape(b, n, c)
        if lo is None:
            return self.h_proj(hi).reshape(b, n, c)
        return _project_both(hi, self.h_proj, lo, self.l_proj).reshape(b, n, c)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, h_heads={self.h_heads}, l_heads={self.l_heads}, head_dim={self.head_dim}, "
                f"ws={self.ws}")


class LinearAttention(nn.Module):
    """Multi-head linear attention layer.

    ``LinearAttention(d_model, n_heads, head_dim=None, v_head_dim=None, feature_map="elu1",
    causal=True, normalize=True, scale=None, bias=False, d_output=None, dropout=0.0)``:

    * ``q_proj``, ``k_proj`` (``d_model → n_heads·head_dim``), ``v_proj`` (``d_model →
      n_heads·v_head_dim``) and ``o_proj`` (``n_heads·v_head_dim → d_output``), bias per
      ``bias``; ``head_dim`` defaults to ``d_model // n_heads``, ``v_head_dim`` to
      ``head_dim``, ``d_output`` to ``d_model``.
    * ``feature_map`` (``"elu1"``: Katharopoulos et al., ``"relu"``, ``"identity"``) is applied
      to q and k inside the kernel; ``scale`` defaults to ``head_dim ** -0.5`` (it cancels when
      ``normalize``).
    * dropout after the output projection.

    ``forward(x, initial_state=None, output_final_state=False, cu_seqlens=None)`` with ``x``
    ``[B, T, d_model]`` returns ``(y [B, T, d_output], final_state)`` where ``final_state``
    follows :func:`fastattn.linear_attention` (pass it back as ``initial_state`` to decode).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        v_head_dim: int | None = None,
        feature_map: str = "elu1",
        causal: bool = True,
        normalize: bool = True,
        scale: float | None = None,
        bias: bool = False,
        d_output: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        _positive("n_heads", n_heads)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {', '.join(map(repr, FEATURE_MAPS))}, got {feature_map!r}")
        if head_dim is None:
            if d_model % n_heads != 0:
                raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads}) unless head_dim is given")
            head_dim = d_model // n_heads
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        d_output = d_model if d_output is None else d_output
        self.d_model, self.n_heads, self.head_dim, self.v_head_dim = d_model, n_heads, head_dim, v_head_dim
        self.feature_map, self.causal, self.normalize, self.scale = feature_map, causal, normalize, scale
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_heads * v_head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * v_head_dim, d_output, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, initial_state=None, output_final_state: bool = False, cu_seqlens=None):
        _input(self, "x", x, "[B, T, d_model]", self.d_model)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_heads, self.v_head_dim)
        o, state = linear_attention(
            q, k, v, scale=self.scale, initial_state=initial_state, output_final_state=output_final_state,
            normalize=self.normalize, cu_seqlens=cu_seqlens, causal=self.causal, feature_map=self.feature_map,
        )
        return self.dropout(self.o_proj(o.reshape(b, t, -1))), state


class _NeighborhoodAttention(nn.Module):
    na_dim = 0

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kernel_size,
        stride=1,
        dilation=1,
        is_causal=False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        r = self.na_dim
        # Per-dimension checks that need no input size (NATTEN checks these here too).
        self.kernel_size = _checks._per_dim("kernel_size", kernel_size, r)
        self.stride = _checks._per_dim("stride", stride, r)
        self.dilation = _checks._per_dim("dilation", dilation, r)
        self.is_causal = _checks._per_dim("is_causal", is_causal, r, bool)
        _checks.na_arguments(
            [k * d for k, d in zip(self.kernel_size, self.dilation)],
            self.kernel_size, self.stride, self.dilation, self.is_causal,
        )
        if num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must evenly divide embed_dim ({embed_dim})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        # `or`, as NATTEN writes it: a qk_scale of 0 also means the default.
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, *spatial, embed_dim]`` → same shape."""
        r = self.na_dim
        _input(self, "x", x, "[B, " + ", ".join(["spatial"] * r) + ", embed_dim]", self.embed_dim)
        b, *spatial, c = x.shape
        qkv = self.qkv(x).reshape(b, *spatial, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=r + 1)
        y = neighborhood_attention(
            q, k, v, self.kernel_size, self.stride, self.dilation, self.is_causal, self.scale
        )
        return self.proj_drop(self.proj(y.reshape(b, *spatial, c)))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}"
        )


_NA_DOC = """NATTEN's ``NeighborhoodAttention{r}D`` on fastattn's kernel.

``NeighborhoodAttention{r}D(embed_dim, num_heads, kernel_size, stride=1, dilation=1,
is_causal=False, qkv_bias=True, qk_scale=None, proj_drop=0.0)``; ``forward(x)`` on
``[B, *{r} spatial dims, embed_dim]``. Layers ``qkv`` (``embed_dim → 3·embed_dim``, bias per
``qkv_bias``) and ``proj`` (``embed_dim → embed_dim``), dropout after ``proj``."""


class NeighborhoodAttention1D(_NeighborhoodAttention):
    __doc__ = _NA_DOC.format(r=1)
    na_dim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    __doc__ = _NA_DOC.format(r=2)
    na_dim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    __doc__ = _NA_DOC.format(r=3)
    na_dim = 3
