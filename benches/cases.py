"""Benchmark cases shared by the pytest-benchmark suite and the main-job table.

A case builds its inputs once and offers, per implementation (fastattn and each peer), a
forward callable and optionally a backward callable (gradients of a saved forward graph),
plus the useful FLOPs of one forward, so rates are comparable across implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import time

import torch
import torch.nn.functional as F

import fastattn


@dataclass
class Impl:
    forward: Callable[[], object] | None
    backward: Callable[[], object] | None = None
    # This implementation's own work on the case, in any unit shared by the family's cases
    # (None: the case's useful FLOPs). The table predicts a call's time from the same
    # implementation's time on a smaller case, scaled by this, and skips calls predicted to
    # exceed its budget; peers whose work grows faster than fastattn's (quadratic in T where
    # fastattn is linear, dense N x N where it is windowed) say so here.
    cost: float | None = None
    # Why a direction is absent, by direction ("fwd"/"bwd"), printed in the table's cell.
    skip: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    op: str
    shape: str
    flops_fwd: float  # useful FLOPs of one forward
    bwd_factor: float  # backward FLOPs = bwd_factor * forward FLOPs
    impls: dict[str, Impl] = field(default_factory=dict)
    # Cases of one series run the same algorithms at growing sizes, so a peer's time on one
    # predicts its time on the next (causal and non-causal forms are different series).
    series: str = ""
    # What the second direction times: "bwd" (the backward of a saved forward graph) or
    # "f+b" (a whole training step of a layer: forward, then backward).
    bwd_label: str = "bwd"


def bench_params(cases: list[Case]) -> list:
    """pytest params ``(case, direction, impl)`` for every implementation that has that
    direction."""
    import pytest

    return [
        pytest.param(case, direction, impl, id=f"{case.op}-{case.shape.replace(' ', '-')}-{direction}-{impl}")
        for case in cases
        for direction in ("fwd", "bwd")
        for impl, fns in case.impls.items()
        if (fns.forward if direction == "fwd" else fns.backward) is not None
    ]


def run_bench(benchmark, case: Case, direction: str, impl: str) -> None:
    """Times one implementation of one case with pytest-benchmark, grouped by shape and
    direction."""
    benchmark.group = f"{case.op} {direction} {case.shape}"
    benchmark.extra_info["gflop"] = case.flops_fwd * (case.bwd_factor if direction == "bwd" else 1) / 1e9
    fn = case.impls[impl].forward if direction == "fwd" else case.impls[impl].backward
    fn()  # warm-up outside the timing (builds the saved graph for bwd, compiles)
    benchmark(fn)


def _grad_of(fn, inputs):
    """A callable computing d(inputs) of fn(*inputs) for a fixed random upstream gradient,
    reusing one saved forward graph so only the backward pass is timed. The graph is built on
    the first (warm-up) call, so listing cases costs nothing."""
    saved = {}

    def backward():
        if not saved:
            xs = [t.detach().requires_grad_(True) for t in inputs]
            out = fn(*xs)
            saved.update(xs=xs, out=out, dout=torch.randn_like(out))
        return torch.autograd.grad(saved["out"], saved["xs"], saved["dout"], retain_graph=True)

    return backward


def _train_step(fn, inputs):
    """A callable running ``fn(*inputs)`` and its backward for a fixed random upstream
    gradient, forward and backward both timed: the attention's share of a training step."""
    xs = [t.detach().requires_grad_(True) for t in inputs]
    upstream = []

    def step():
        out = fn(*xs)
        if not upstream:  # the warm-up call
            upstream.append(torch.randn_like(out))
        return torch.autograd.grad(out, xs, upstream[0])

    return step


def attention_cases(ts=(512, 2048, 8192), b=1, h=8, d=64, dtype=torch.float32) -> list[Case]:
    cases = []
    for t in ts:
        for causal in (False, True):
            q, k, v = (torch.randn(b, t, h, d, dtype=dtype) for _ in range(3))
            # SDPA takes [B, H, T, D]; its own layout is given to it so no copy is timed.
            qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

            def ours(q, k, v, causal=causal):
                return fastattn.attention(q, k, v, is_causal=causal)

            def sdpa(q, k, v, causal=causal):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
            case = Case("attention", f"B{b} H{h} T{t} D{d}{' causal' if causal else ''}", flops, 2.5,
                        series=f"attention causal={causal}")
            case.impls["fastattn"] = Impl(lambda q=q, k=k, v=v, f=ours: f(q, k, v), _grad_of(ours, (q, k, v)))
            case.impls["torch_sdpa"] = Impl(lambda q=qh, k=kh, v=vh, f=sdpa: f(q, k, v), _grad_of(sdpa, (qh, kh, vh)))
            cases.append(case)
    return cases


# --- linear attention and flow attention --------------------------------------------------

LF_CHUNK = 64  # fastattn's chunk size (for the FLOP count of the chunked algorithm)


def _plain_linear(q, k, v):
    """Plain PyTorch causal linear attention (fla semantics, normalize=True): the oracle from
    ``fastattn.reference`` when present, else the same cumulative-sum formula inline."""
    try:
        from fastattn.reference.linear import linear_attention as ref
    except ImportError:
        ref = None
    if ref is not None:
        return ref(q, k, v)[0]
    s = k.shape[-1] ** -0.5
    kv = torch.einsum("bthk,bthv->bthkv", k, v).cumsum(1)
    o = torch.einsum("bthk,bthkv->bthv", q * s, kv)
    return o / ((q * s * k.cumsum(1)).sum(-1, keepdim=True) + 1e-10)


def _plain_flow(q, k, v, causal):
    try:
        from fastattn.reference.flow import flow_attention as ref
    except ImportError:
        ref = None
    if ref is not None:
        return ref(q, k, v, causal=causal)
    eps = 1e-6
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    n, m = q.shape[2], k.shape[2]
    if not causal:
        inc = 1.0 / torch.einsum("bhld,bhd->bhl", q + eps, k.sum(2) + eps)
        out_ = 1.0 / torch.einsum("bhld,bhd->bhl", k + eps, q.sum(2) + eps)
        sink = torch.einsum("bhld,bhd->bhl", q + eps, (k * out_[..., None]).sum(2) + eps)
        src = torch.einsum("bhld,bhd->bhl", k + eps, (q * inc[..., None]).sum(2) + eps).clamp(-1, 1)
        kv = torch.einsum("bhld,bhlm->bhdm", k, v * (torch.softmax(src, -1) * m)[..., None])
        x = torch.einsum("bhld,bhdm->bhlm", q * inc[..., None], kv) * torch.sigmoid(sink * (n / m))[..., None]
    else:
        t = torch.arange(1, n + 1, dtype=q.dtype)[None, None, :]
        inc = 1.0 / torch.einsum("bhld,bhld->bhl", q + eps, k.cumsum(2) + eps)
        out_ = 1.0 / torch.einsum("bhld,bhld->bhl", k + eps, q.cumsum(2) + eps)
        sink = torch.einsum("bhld,bhld->bhl", q + eps, (k * (out_ * t)[..., None]).cumsum(2) + eps) / t
        src = (torch.einsum("bhld,bhld->bhl", k + eps, (q * (inc * t)[..., None]).cumsum(2) + eps) / t).clamp(-1, 1)
        e = torch.exp(src)
        kv = torch.einsum("bhld,bhlm->bhldm", k, v * (e / e.cumsum(-1) * t)[..., None]).cumsum(2)
        x = torch.einsum("bhld,bhldm->bhlm", q * inc[..., None], kv) * torch.sigmoid(sink)[..., None]
    return x.transpose(1, 2)


# Peers skipped where they would take minutes or tens of GB: the plain PyTorch causal forms
# materialise a [B, T, H, D, Dv] cumulative sum (2 GiB forward at T=16384, several times that
# with autograd). fla's naive recurrence writes `o[:, t]` in place for every step; backward
# through those T copy-slice nodes sometimes holds a full-size gradient per step at once: at
# T=4096 its process went from under 2 GB to the 24 GB OOM kill in 4 of 7 table runs, so its
# backward runs up to T=1024 only (its forward at every T).
_PLAIN_CAUSAL_MAX_T = 4096
_NAIVE_BWD_MAX_T = 1024
_PLAIN_CAUSAL_SKIP = {d: f"memory: [T, D, Dv] cumsum above T={_PLAIN_CAUSAL_MAX_T}" for d in ("fwd", "bwd")}


def linear_cases(ts=(1024, 4096, 16384), b=1, h=8, d=64, dtype=torch.float32) -> list[Case]:
    """Causal linear attention (fla defaults: normalize=True, scale D**-0.5), vs fla's naive
    recurrence, the plain PyTorch formula and causal SDPA (the quadratic baseline)."""
    try:
        from fla.ops.linear_attn.naive import naive_recurrent_linear_attn as naive
    except ImportError:  # pragma: no cover
        naive = None
    cases = []
    for t in ts:
        q, k, v = (torch.rand(b, t, h, d, dtype=dtype) for _ in range(3))
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

        def ours(q, k, v):
            return fastattn.linear_attention(q, k, v)[0]

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        # recurrent form 4·T·D·Dv plus the causal halves of the intra-chunk blocks
        flops = b * h * t * (4 * d * d + LF_CHUNK * 2 * d)
        case = Case("linear", f"B{b} H{h} T{t} D{d} causal", flops, 2.5)
        case.impls["fastattn"] = Impl(lambda q=q, k=k, v=v: ours(q, k, v), _grad_of(ours, (q, k, v)))
        if naive is not None:
            def fla_naive(q, k, v):
                return naive(q, k, v, normalize=True)[0]

            case.impls["fla_naive"] = Impl(
                lambda q=q, k=k, v=v: fla_naive(q, k, v),
                _grad_of(fla_naive, (q, k, v)) if t <= _NAIVE_BWD_MAX_T else None,
                skip={} if t <= _NAIVE_BWD_MAX_T else {"bwd": f"memory: OOM-killed above T={_NAIVE_BWD_MAX_T}"},
            )
        if t <= _PLAIN_CAUSAL_MAX_T:
            # a Python loop of T state updates: its backward measured 16x slower for 4x T
            # (0.44 s at T=1024, 7.2 s at 4096), so its work is counted as T^2
            case.impls["torch_plain"] = Impl(lambda q=q, k=k, v=v: _plain_linear(q, k, v),
                                             _grad_of(_plain_linear, (q, k, v)), cost=float(b * h * t * t))
        else:
            case.impls["torch_plain"] = Impl(None, skip=_PLAIN_CAUSAL_SKIP)
        case.impls["torch_sdpa_causal"] = Impl(lambda q=qh, k=kh, v=vh: sdpa(q, k, v), _grad_of(sdpa, (qh, kh, vh)),
                                                cost=2.0 * b * h * t * t * d)
        cases.append(case)
    return cases


def flow_cases(ts=(1024, 4096, 16384), b=1, h=8, d=64, dtype=torch.float32) -> list[Case]:
    """Flow-Attention, non-causal and causal, vs the plain PyTorch implementation (Flowformer's
    math) and SDPA (the quadratic baseline)."""
    cases = []
    for t in ts:
        for causal in (False, True):
            q, k, v = (torch.randn(b, t, h, d, dtype=dtype) for _ in range(3))
            qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

            def ours(q, k, v, causal=causal):
                return fastattn.flow_attention(q, k, v, causal=causal)

            def plain(q, k, v, causal=causal):
                return _plain_flow(q, k, v, causal)

            def sdpa(q, k, v, causal=causal):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            flops = b * h * t * (4 * d * d + (LF_CHUNK * 2 * d if causal else 0))
            case = Case("flow", f"B{b} H{h} T{t} D{d}{' causal' if causal else ''}", flops, 2.5,
                        series=f"flow causal={causal}")
            case.impls["fastattn"] = Impl(lambda q=q, k=k, v=v, f=ours: f(q, k, v), _grad_of(ours, (q, k, v)))
            if not causal or t <= _PLAIN_CAUSAL_MAX_T:
                case.impls["torch_plain"] = Impl(lambda q=q, k=k, v=v, f=plain: f(q, k, v), _grad_of(plain, (q, k, v)))
            else:
                case.impls["torch_plain"] = Impl(None, skip=_PLAIN_CAUSAL_SKIP)
            case.impls["torch_sdpa"] = Impl(lambda q=qh, k=kh, v=vh, f=sdpa: f(q, k, v), _grad_of(sdpa, (qh, kh, vh)),
                                            cost=(2.0 if causal else 4.0) * b * h * t * t * d)
            cases.append(case)
    return cases


# --- neighborhood attention ----------------------------------------------------------------

# (batch, spatial, heads, head_dim, kernel_size, dilation): the neighborhood table's shapes
# (1-D long window, 2-D small and large windows, dilated 2-D, small 3-D).
NA_SHAPES = [
    (1, (4096,), 4, 64, 63, 1),
    (1, (56, 56), 4, 32, 7, 1),
    (1, (64, 64), 4, 64, 13, 1),
    (2, (128, 128), 4, 32, 7, 2),
    (1, (8, 16, 16), 4, 64, 3, 1),
]
# Peers that materialise the [B, H, N, N] score matrix (natten's CPU path, our plain
# reference) run up to this many tokens (at 16384 that matrix alone is 8 GiB).
_NA_DENSE_MAX_N = 8192
# Reference backward keeps several such matrices alive.
_NA_REF_BWD_MAX_N = 4096


def _lazy(build):
    """``build()`` on first use, then the cached value (so listing cases costs nothing)."""
    cache = []

    def get():
        if not cache:
            cache.append(build())
        return cache[0]

    return get


def neighborhood_cases(shapes=None, dtype=torch.float32) -> list[Case]:
    """Neighborhood attention (NATTEN semantics) vs natten's CPU forward, torch flex attention
    compiled with a neighborhood block mask (forward only: flex has no CPU backward), SDPA
    with the boolean neighborhood mask, and fastattn's plain reference."""
    from fastattn.reference import neighborhood_attention as ref_na, neighborhood_mask

    cases = []
    for b, spatial, h, d, ks, dil in shapes or NA_SHAPES:
        n = 1
        for x in spatial:
            n *= x
        q, k, v = (torch.randn(b, *spatial, h, d, dtype=dtype) for _ in range(3))
        qh, kh, vh = (x.reshape(b, n, h, d).transpose(1, 2).contiguous() for x in (q, k, v))
        mask = _lazy(lambda spatial=spatial, ks=ks, dil=dil: neighborhood_mask(spatial, ks, 1, dil))

        def ours(q, k, v, ks=ks, dil=dil):
            return fastattn.neighborhood_attention(q, k, v, ks, dilation=dil)

        def sdpa(q, k, v, mask=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask())

        def ref(q, k, v, ks=ks, dil=dil):
            return ref_na(q, k, v, ks, dilation=dil)

        name = "x".join(map(str, spatial))
        shape = f"B{b} H{h} {name} D{d} k{ks}" + (f" d{dil}" if dil > 1 else "")
        case = Case(f"na{len(spatial)}d", shape, 4.0 * b * h * n * ks ** len(spatial) * d, 2.5)
        dense = 4.0 * b * h * n * n * d  # the peers that score every (query, key) pair
        case.impls["fastattn"] = Impl(lambda q=q, k=k, v=v, f=ours: f(q, k, v), _grad_of(ours, (q, k, v)))
        no_bwd = {"bwd": "no CPU backward"}
        if n <= _NA_DENSE_MAX_N:
            case.impls["natten"] = Impl(_natten_forward(q, k, v, ks, dil), cost=dense, skip=no_bwd)
            case.impls["reference"] = Impl(
                lambda q=q, k=k, v=v, f=ref: f(q, k, v),
                _grad_of(ref, (q, k, v)) if n <= _NA_REF_BWD_MAX_N else None,
                cost=dense,
                skip={} if n <= _NA_REF_BWD_MAX_N else {"bwd": f"memory: N x N graph above N={_NA_REF_BWD_MAX_N}"},
            )
        else:
            too_big = {d: f"memory: N x N scores above N={_NA_DENSE_MAX_N}" for d in ("fwd", "bwd")}
            case.impls["natten"] = Impl(None, skip=too_big)
            case.impls["reference"] = Impl(None, skip=too_big)
        case.impls["flex_compiled"] = Impl(_flex_forward(qh, kh, vh, mask, spatial, ks, dil), skip=no_bwd)
        case.impls["torch_sdpa_mask"] = Impl(lambda q=qh, k=kh, v=vh, f=sdpa: f(q, k, v), _grad_of(sdpa, (qh, kh, vh)),
                                             cost=dense)
        cases.append(case)
    return cases


def _natten_forward(q, k, v, ks, dil):
    def run():
        import natten

        fn = {4: natten.na1d, 5: natten.na2d, 6: natten.na3d}[q.dim()]
        with torch.no_grad():
            return fn(q, k, v, kernel_size=ks, dilation=dil)

    return run


def _flex_forward(q, k, v, mask, spatial, ks, dil):
    """Flex attention compiled (fullgraph) with the neighborhood as a block mask, built in the
    (untimed) warm-up call. The mask_mod either looks the pair up in the dense mask or
    computes the windows from the indices; neither is faster everywhere (na1d k63: the
    arithmetic one, 16 vs 20 ms; 56x56 k7: the lookup, 21 vs 43 ms), so the warm-up times
    both (a mask_mod inductor fails to compile is skipped) and the peer keeps the faster."""
    state = {}

    def build():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        dense = mask()
        n = dense.shape[0]
        fn = torch.compile(flex_attention, fullgraph=True)
        best = None
        for mod in (lambda b, h, qi, ki: dense[qi, ki], _na_mask_mod(spatial, ks, dil)):
            try:
                block = create_block_mask(mod, None, None, n, n, device="cpu")
                with torch.no_grad():
                    fn(q, k, v, block_mask=block)
                    t = min(_timed(lambda: fn(q, k, v, block_mask=block)) for _ in range(3))
            except Exception:  # noqa: BLE001 - inductor's CPU codegen rejects some mask_mods
                continue
            if best is None or t < best[0]:
                best = (t, block)
        if best is None:
            raise RuntimeError("no flex mask_mod compiled")
        state["mask"], state["fn"] = best[1], fn

    def run():
        if not state:
            build()
        with torch.no_grad():
            return state["fn"](q, k, v, block_mask=state["mask"])

    return run


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def _na_mask_mod(spatial, ks, dil):
    """NATTEN's non-causal stride-1 window as a flex mask_mod on flattened indices: per
    dimension, same dilation group and key index inside the clamped window of the query's."""

    def coords(i):
        out = []
        for size in reversed(spatial):
            out.append(i % size)
            i = i // size
        return out[::-1]

    def mod(b, h, qi, ki):
        ok = None
        for c_q, c_k, size in zip(coords(qi), coords(ki), spatial):
            if dil == 1:
                start = (c_q - ks // 2).clamp(0, size - ks)
                inside = (c_k >= start) & (c_k < start + ks)
            else:
                g = c_q % dil
                last = (size - g + dil - 1) // dil - ks
                start = (c_q // dil - ks // 2).clamp(min=0)
                start = torch.where(start > last, last, start)
                kk = c_k // dil
                inside = (c_k % dil == g) & (kk >= start) & (kk < start + ks)
            ok = inside if ok is None else ok & inside
        return ok

    return mod


# --- HiLo ----------------------------------------------------------------------------------

# (B, H, W, dim, heads): the LITv2 paper's single-layer benchmark (dim 768, 12 heads), LITv2-S
# stage 3, a detection-size map whose width is not a multiple of the window (the padded
# form) and a stage-1-size map, all at LITv2's alpha 0.9, window 2, qkv_bias.
HILO_SHAPES = [
    (64, 14, 14, 768, 12),
    (64, 14, 14, 384, 12),
    (2, 50, 75, 384, 12),
    (8, 56, 56, 192, 6),
]
HILO_ALPHA, HILO_WS = 0.9, 2


def _layer_step(layer, x, H, W):
    """Forward (inference mode) and forward+backward (gradients of the input and every
    parameter for fixed upstream gradients, nothing accumulated into ``.grad``) of a layer
    called as ``layer(x, H, W)``, which returns a tensor or a tuple of them."""
    params = list(layer.parameters())
    xg = x.detach().requires_grad_(True)
    upstream = []

    def forward():
        with torch.inference_mode():
            return layer(x, H, W)

    def train():
        out = layer(xg, H, W)
        out = out if isinstance(out, tuple) else (out,)
        if not upstream:  # the warm-up call
            upstream.extend(torch.randn_like(o) for o in out)
        return torch.autograd.grad(out, [xg, *params], upstream)

    return forward, train


class _ProjectionFloor(torch.nn.Module):
    """The HiLo layer's Linear layers alone on the inputs they see (``h_qkv`` then ``h_proj``
    on its q part, ``l_q`` then ``l_proj``, ``l_kv`` on one token per window), their outputs
    returned as they are: what any HiLo that keeps torch's projections must spend."""

    def __init__(self, hilo):
        super().__init__()
        self.m = hilo

    def forward(self, x, H, W):
        m, b = self.m, x.shape[0]
        x4 = x.reshape(b, H, W, m.dim)
        outs = ()
        if m.h_heads:
            outs += (m.h_proj(m.h_qkv(x4)[..., :m.h_dim]),)
        if m.l_heads:
            outs += (m.l_proj(m.l_q(x4)), m.l_kv(x4[:, ::m.ws, ::m.ws]))
        return outs


def hilo_flops(b, H, W, dim, heads, alpha=HILO_ALPHA, ws=HILO_WS):
    """(projection, attention) FLOPs of one HiLo forward (the module's useful work)."""
    hd = dim // heads
    lh = int(heads * alpha) if ws > 1 else heads
    hh = heads - lh
    n, p = b * H * W, b * -(-H // ws) * -(-W // ws)
    proj = 2 * n * dim * 3 * hh * hd + 2 * n * (hh * hd) ** 2
    proj += 2 * n * dim * lh * hd + 2 * p * dim * 2 * lh * hd + 2 * n * (lh * hd) ** 2
    attn = 4 * n * hd * (hh * ws * ws + lh * p // b)
    return proj, attn


def hilo_cases(shapes=None, dtype=torch.float32) -> list[Case]:
    """LITv2's HiLo layer (``fastattn.nn.HiLo``) against the layer as LITv2 writes it
    (``fastattn.reference.HiLo``, the same weights) and the projection floor, forward in
    inference mode and a forward+backward training step."""
    from fastattn.reference import HiLo as LITv2HiLo

    cases = []
    for b, H, W, dim, heads in shapes or HILO_SHAPES:
        eager = LITv2HiLo(dim, heads, qkv_bias=True, window_size=HILO_WS, alpha=HILO_ALPHA).to(dtype)
        ours = fastattn.nn.HiLo(dim, heads, qkv_bias=True, window_size=HILO_WS, alpha=HILO_ALPHA).to(dtype)
        ours.load_state_dict(eager.state_dict())
        floor = _ProjectionFloor(ours)
        x = torch.randn(b, H * W, dim, dtype=dtype)
        proj, attn = hilo_flops(b, H, W, dim, heads)
        case = Case("hilo", f"B{b} {H}x{W} C{dim} h{heads}", proj + attn, (3 * proj + 3.5 * attn) / (proj + attn),
                    series="hilo", bwd_label="f+b")
        for name, layer in (("fastattn", ours), ("litv2_eager", eager), ("proj_floor", floor)):
            case.impls[name] = Impl(*_layer_step(layer, x, H, W))
        cases.append(case)
    return cases


# --- landmark attention ----------------------------------------------------------------------

LANDMARK_BLOCK = 64
# The eager grouped softmax keeps several [B, H, T, T] tensors alive (2 GiB each at T=8192).
_LANDMARK_EAGER_MAX_T = 4096


def landmark_cases(ts=(2048, 8192), b=1, h=8, d=64, dtype=torch.float32) -> list[Case]:
    """Landmark attention's training form (block 64) vs the eager grouped softmax as the
    original writes it (``fastattn.reference``), fastattn's own causal attention and causal
    SDPA on the same shape (the dense baselines it is measured against): forward, and a
    training step (forward and backward timed together, ``f+b``)."""
    from fastattn.reference import landmark_attention as eager

    cases = []
    for t in ts:
        q, k, v = (torch.randn(b, t, h, d, dtype=dtype) for _ in range(3))
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

        def ours(q, k, v):
            return fastattn.landmark_attention(q, k, v, LANDMARK_BLOCK)

        def plain(q, k, v):
            return eager(q, k, v, LANDMARK_BLOCK)

        def causal(q, k, v):
            return fastattn.attention(q, k, v, is_causal=True)

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        # the causal score and value products, as for causal dense attention; a training step
        # (forward and backward timed together) counts 1 + 2.5 forwards
        flops = 2.0 * b * h * t * t * d
        case = Case("landmark", f"B{b} H{h} T{t} D{d} block{LANDMARK_BLOCK}", flops, 3.5, series="landmark",
                    bwd_label="f+b")
        case.impls["fastattn"] = Impl(lambda q=q, k=k, v=v: ours(q, k, v), _train_step(ours, (q, k, v)))
        if t <= _LANDMARK_EAGER_MAX_T:
            case.impls["eager_grouped"] = Impl(lambda q=q, k=k, v=v: plain(q, k, v), _train_step(plain, (q, k, v)))
        else:
            case.impls["eager_grouped"] = Impl(
                None, skip={x: f"memory: [B, H, T, T] scores above T={_LANDMARK_EAGER_MAX_T}" for x in ("fwd", "bwd")})
        case.impls["fastattn_causal"] = Impl(lambda q=q, k=k, v=v: causal(q, k, v), _train_step(causal, (q, k, v)))
        case.impls["torch_sdpa_causal"] = Impl(lambda q=qh, k=kh, v=vh: sdpa(q, k, v), _train_step(sdpa, (qh, kh, vh)))
        cases.append(case)
    return cases + landmark_decode_cases(**({"cache": 4096} if min(ts) < 2048 else {}))


def landmark_decode_cases(cache=32768, b=1, h=32, d=128, top_k=4, dtype=torch.float32) -> list[Case]:
    """One decode token with landmark retrieval (top_k blocks of 64) vs SDPA over the whole
    cache and the eager retrieval (``fastattn.reference``, which scores every cached token);
    forward only (inference)."""
    from fastattn.reference import landmark_retrieval_attention as eager

    q = torch.randn(b, 1, h, d, dtype=dtype)
    k, v = (torch.randn(b, cache, h, d, dtype=dtype) for _ in range(2))
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def ours():
        with torch.no_grad():
            return fastattn.landmark_retrieval_attention(q, k, v, LANDMARK_BLOCK, top_k)

    def plain():
        with torch.no_grad():
            return eager(q, k, v, LANDMARK_BLOCK, top_k)

    def sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qh, kh, vh)

    # retrieval's own work: a score per landmark, then the kept blocks and the own block
    flops = 2.0 * b * h * (cache // LANDMARK_BLOCK) * d + 4.0 * b * h * (top_k + 1) * LANDMARK_BLOCK * d
    case = Case("landmark", f"decode B{b} H{h} cache{cache} D{d} top{top_k}", flops, 1.0, series="landmark decode")
    no_bwd = {"bwd": "inference only"}
    case.impls["fastattn"] = Impl(ours, skip=no_bwd)
    case.impls["eager_retrieval"] = Impl(plain, skip=no_bwd)
    case.impls["torch_sdpa_full_cache"] = Impl(sdpa, skip=no_bwd)
    return [case]


FAMILIES: dict[str, Callable[..., list[Case]]] = {
    "attention": attention_cases,
    "neighborhood": neighborhood_cases,
    "linear": linear_cases,
    "flow": flow_cases,
    "hilo": hilo_cases,
}

# Families the default run leaves out (its time budget), run with ``--family NAME``.
OPT_IN: dict[str, Callable[..., list[Case]]] = {
    "landmark": landmark_cases,
}
ALL_FAMILIES = {**FAMILIES, **OPT_IN}

# ``--quick``: every family at small shapes (smaller than its first default one), so the whole
# table runs in under a minute on 2 cores.
QUICK: dict[str, dict] = {
    "attention": {"ts": (512,)},
    "neighborhood": {"shapes": [(1, (24, 24), 4, 32, 7, 1)]},  # flex compiles ~5 s a shape
    "linear": {"ts": (512,)},
    "flow": {"ts": (512,)},
    "hilo": {"shapes": [(8, 14, 14, 192, 6)]},
    "landmark": {"ts": (1024,)},
}
