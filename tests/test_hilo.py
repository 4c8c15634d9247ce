"""HiLo (docs/hilo.md): ``fastattn.nn.HiLo`` against LITv2's layer as ``fastattn.reference``
writes it (outputs and the gradients of the input and every parameter, float64, fp32, bf16),
and the functional op against a float64 transcription of the attention boundary at every SIMD
level, gradcheck included."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.nn import HiLo
from fastattn.reference import HiLo as RefHiLo

D64 = torch.float64

# (B, H, W, dim, heads, ws, alpha, qkv_bias, qk_scale)
MODULE_CASES = [
    (2, 6, 8, 24, 3, 2, 0.5, True, None),
    (1, 7, 5, 32, 4, 2, 0.9, True, None),       # padded bottom and right, qkv bias fills the pad
    (2, 9, 10, 36, 6, 3, 0.7, False, 0.3),      # ws 3, padded, qk_scale
    (1, 9, 13, 16, 2, 4, 0.5, True, None),      # ws 4, both sides padded
    (1, 5, 6, 24, 3, 1, 0.5, True, None),       # ws 1: plain MHSA, no Hi-Fi layers
    (2, 4, 6, 20, 5, 2, 0.0, True, None),       # alpha 0: Hi-Fi only
    (1, 6, 4, 24, 4, 2, 1.0, False, None),      # alpha 1: Lo-Fi only
    (1, 3, 3, 24, 4, 4, 0.5, True, None),       # window larger than the map
    (1, 14, 14, 48, 12, 2, 0.9, True, None),    # LITv2's split: int(12 * 0.9) = 10 Lo-Fi heads
]


def _pair(dim, heads, ws, alpha, qkv_bias, qk_scale, dtype=D64, seed=0):
    torch.manual_seed(seed)
    ref = RefHiLo(dim, heads, qkv_bias, qk_scale, window_size=ws, alpha=alpha).to(dtype)
    ours = HiLo(dim, heads, qkv_bias, qk_scale, window_size=ws, alpha=alpha).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    if qkv_bias:  # LITv2 initialises biases to zero in its models; random ones test the pad path
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
            ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _case_id(c):
    return "B{}-{}x{}-d{}-h{}-ws{}-a{}-bias{}-s{}".format(*c)


@pytest.mark.parametrize("case", MODULE_CASES, ids=_case_id)
def test_module_matches_litv2_float64(case):
    b, H, W, dim, heads, ws, alpha, bias, qs = case
    ref, ours = _pair(dim, heads, ws, alpha, bias, qs)
    assert (ours.l_heads, ours.h_heads, ours.l_dim, ours.h_dim, ours.ws, ours.scale) == (
        ref.l_heads, ref.h_heads, ref.l_dim, ref.h_dim, ref.ws, ref.scale)
    x = torch.randn(b, H * W, dim, dtype=D64, requires_grad=True)
    want, got = ref(x, H, W), ours(x, H, W)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(want)
    params = [p for _, p in sorted(ref.named_parameters())]
    ours_params = [p for _, p in sorted(ours.named_parameters())]
    want_grads = torch.autograd.grad(want, [x, *params], g)
    got_grads = torch.autograd.grad(got, [x, *ours_params], g)
    names = ["x", *sorted(n for n, _ in ref.named_parameters())]
    for name, a, e in zip(names, got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=lambda m: f"d{name}: {m}")


def test_state_dict_loads_both_ways_strictly():
    for ws, alpha in [(2, 0.9), (1, 0.5), (2, 0.0), (2, 1.0)]:
        ref = RefHiLo(48, 6, True, window_size=ws, alpha=alpha)
        ours = HiLo(48, 6, True, window_size=ws, alpha=alpha)
        assert set(ours.state_dict()) == set(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)
        ref.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("head_dim", [32, 64])
def test_module_fp32_whole_panel_heads(simd_level, head_dim):
    """Head dims that are whole GEMM panels take the Lo-Fi forward that writes its output
    rows in place (fp32 only); forward and input gradient against the float64 layer."""
    ref, _ = _pair(3 * head_dim, 3, 2, 0.67, True, None)
    ours = HiLo(3 * head_dim, 3, True, window_size=2, alpha=0.67)
    ours.load_state_dict(ref.state_dict())
    ours = ours.float()
    x = torch.randn(2, 7 * 10, 3 * head_dim, dtype=D64)
    want = ref(x, 7, 10)
    xl = x.float().requires_grad_()
    got = ours(xl, 7, 10)
    assert (got.double() - want).abs().max() / want.abs().max() < 2e-5
    g = torch.randn_like(want)
    got.backward(g.float())
    xr = x.clone().requires_grad_()
    ref(xr, 7, 10).backward(g)
    assert (xl.grad.double() - xr.grad).abs().max() / xr.grad.abs().max() < 2e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_module_fp32_and_bf16_within_dtype_tolerance(dtype, tol):
    ref, _ = _pair(64, 8, 2, 0.75, True, None)
    ours = HiLo(64, 8, True, window_size=2, alpha=0.75)
    ours.load_state_dict(ref.state_dict())
    ours = ours.to(dtype)
    x = torch.randn(2, 11 * 9, 64, dtype=D64)
    want = ref(x, 11, 9)
    xl = x.to(dtype).requires_grad_()
    got = ours(xl, 11, 9)
    assert got.dtype == dtype
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < tol, err
    g = torch.randn_like(want)
    got.backward(g.to(dtype))
    xr = x.clone().requires_grad_()
    ref(xr, 11, 9).backward(g)
    gerr = (xl.grad.double() - xr.grad).abs().max() / xr.grad.abs().max()
    assert gerr < 10 * tol, gerr
    w_ours = ours.l_q.weight.grad.double()
    w_ref = ref.l_q.weight.grad
    assert (w_ours - w_ref).abs().max() / w_ref.abs().max() < 10 * tol


def test_module_inference_mode_and_no_grad_match_autograd():
    ref, ours = _pair(40, 5, 2, 0.6, True, None, dtype=torch.float32)
    x = torch.randn(3, 7 * 9, 40)
    want = ref(x, 7, 9)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x, 7, 9), want, rtol=2e-5, atol=2e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 7, 9), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("shape", [(7, 9, 64, 2, 0.6), (8, 6, 64, 4, 0.5), (5, 5, 64, 2, 1.0), (6, 7, 64, 2, 0.0)])
def test_module_inference_writes_over_projections_with_the_same_numbers(shape, monkeypatch):
    """Inference calls write the attention outputs over the module's own projection outputs:
    the same output as the autograd path, bit for bit (one dtype, the same kernels)."""
    import fastattn.nn as fnn

    H, W, dim, heads, alpha = shape
    _, ours = _pair(dim, heads, 2, alpha, True, None, dtype=torch.float32)
    x = torch.randn(2, H * W, dim)
    want = ours(x.requires_grad_(), H, W).detach()
    taken = []
    real = fnn._hilo_over_inputs
    monkeypatch.setattr(fnn, "_hilo_over_inputs", lambda *a: taken.append(real(*a)) or taken[-1])
    with torch.inference_mode():
        assert torch.equal(ours(x, H, W), want)
    assert taken and taken[0] is not None


@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("needs", ["all", "inputs", "weights"])
def test_project_both_gradcheck(biases, needs):
    """The layer's two output projections written into one buffer, and their gradients read
    from the output gradient's column blocks, against float64 gradcheck (a strided Hi-Fi
    input, as inference hands it over; a bias missing; only some gradients asked for)."""
    from fastattn.nn import _ProjectBoth

    hi = torch.randn(2, 3, 4, 9, dtype=D64)[..., 2:7]
    lo = torch.randn(2, 3, 4, 6, dtype=D64)
    wh, wl = torch.randn(5, 5, dtype=D64), torch.randn(7, 6, dtype=D64)
    bh = torch.randn(5, dtype=D64) if biases[0] else None
    bl = torch.randn(7, dtype=D64) if biases[1] else None
    for t in {"all": (hi, lo, wh, bh, wl, bl), "inputs": (hi, lo), "weights": (wh, bh, wl, bl)}[needs]:
        if t is not None:
            t.requires_grad_()
    want = torch.cat((F.linear(hi, wh, bh), F.linear(lo, wl, bl)), -1)
    torch.testing.assert_close(_ProjectBoth.apply(hi, lo, wh, bh, wl, bl), want)
    assert torch.autograd.gradcheck(_ProjectBoth.apply, (hi, lo, wh, bh, wl, bl))


@pytest.mark.parametrize("H,W,ws", [(4, 6, 2), (5, 7, 3), (3, 2, 4), (3, 3, 1)])
@pytest.mark.parametrize("needs", ["all", "x", "weights"])
def test_project_inputs_gradcheck(H, W, ws, needs):
    """The three input projections with their in-place input gradient (pool gradient added
    per window offset, padded maps included) against float64 gradcheck."""
    from fastattn.nn import _ProjectInputs

    x = torch.randn(2, H, W, 4, dtype=D64)
    ws_ = [torch.randn(n, 4, dtype=D64) for n in (6, 3, 5)]
    bs = [torch.randn(6, dtype=D64), None, torch.randn(5, dtype=D64)]
    for t in {"all": [x, *ws_, bs[0], bs[2]], "x": [x], "weights": ws_}[needs]:
        t.requires_grad_()
    args = (x, ws, ws_[0], bs[0], ws_[1], bs[1], ws_[2], bs[2])
    got = _ProjectInputs.apply(*args)
    xp = F.pad(x, (0, 0, 0, -W % ws, 0, -H % ws))  # LITv2's zero padding, then mean pooling
    pooled = xp.view(2, xp.shape[1] // ws, ws, xp.shape[2] // ws, ws, 4).mean((2, 4))
    want = (F.linear(x, ws_[0], bs[0]), F.linear(x, ws_[1]), F.linear(pooled, ws_[2], bs[2]))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(_ProjectInputs.apply, args)


def test_module_inference_leaves_a_replaced_layers_input_alone():
    """A layer swapped for one that returns a view of its input must not have the attention
    outputs written over that input."""
    _, ours = _pair(48, 4, 2, 1.0, False, None, dtype=torch.float32)
    ours.l_q = torch.nn.Identity()  # Lo-Fi only, l_dim == dim: l_q(x) is a view of x
    x = torch.randn(2, 6 * 4, 48)
    keep = x.clone()
    with torch.no_grad():
        ours(x, 6, 4)
    assert torch.equal(x, keep)


def test_module_inference_leaves_hooked_projection_outputs_alone():
    _, ours = _pair(40, 5, 2, 0.6, True, None, dtype=torch.float32)
    x = torch.randn(2, 7 * 9, 40)
    seen = {}
    for name in ("h_qkv", "l_q"):
        getattr(ours, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: (o, o.clone())}))
    with torch.no_grad():
        ours(x, 7, 9)
    for out, copy in seen.values():
        assert torch.equal(out, copy)


# --- the functional op against the boundary's float64 transcription --------------------------


def boundary_reference(hi_qkv, lo_q, lo_kv, ws, hd, scale, pad=None):
    """docs/hilo.md at the attention boundary, written with plain torch ops: the Hi-Fi map
    padded with the pad token's k|v (zero q), ws×ws windows, a softmax per window; every Lo-Fi
    query against all pooled keys. Returns ``(hi, lo, lse)`` (None for an absent branch)."""
    hi = lo = lse = None
    if hi_qkv is not None:
        b, H, W, c = hi_qkv.shape
        nh = c // (3 * hd)
        hdim = nh * hd
        hp, wp = -(-H // ws) * ws, -(-W // ws) * ws
        pad_kv = pad if pad is not None else hi_qkv.new_zeros(2 * hdim)
        fill = torch.cat([hi_qkv.new_zeros(hdim), pad_kv])
        grid = fill.expand(b, hp, wp, 3 * hdim).clone()
        grid[:, :H, :W] = hi_qkv
        gh, gw = hp // ws, wp // ws
        qkv = grid.reshape(b, gh, ws, gw, ws, 3, nh, hd).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = qkv.reshape(3, b, gh, gw, nh, ws * ws, hd)
        o = torch.softmax(scale * q @ k.transpose(-1, -2), -1) @ v
        o = o.reshape(b, gh, gw, nh, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, hdim)
        hi = o[:, :H, :W]
    if lo_q is not None:
        b, H, W, c = lo_q.shape
        nl = c // hd
        q = lo_q.reshape(b, H * W, nl, hd).transpose(1, 2)
        kv = lo_kv.reshape(b, -1, 2, nl, hd)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        s = scale * q @ k.transpose(-1, -2)
        lo = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, H, W, c)
        lse = torch.logsumexp(s, -1).transpose(1, 2)
    return hi, lo, lse


# (B, H, W, ws, hd, hi_heads, lo_heads, with pad kv)
OP_CASES = [
    (2, 4, 6, 2, 8, 1, 3, False),
    (1, 5, 7, 2, 5, 2, 2, True),
    (1, 7, 5, 3, 4, 1, 1, True),
    (2, 6, 9, 4, 16, 2, 1, False),
    (1, 4, 4, 1, 8, 0, 4, False),
    (1, 3, 5, 2, 8, 3, 0, True),
    (1, 2, 3, 4, 6, 1, 2, True),
    (1, 9, 8, 8, 33, 1, 1, True),     # ws 8: 64-token windows, head dim past two vectors
    (1, 12, 11, 2, 4, 1, 1, True),    # one Lo-Fi head: several query chunks, the last partial
    (3, 14, 14, 2, 32, 2, 10, False),  # LITv2-S's split, 49 pooled keys
]


def _op_inputs(case, dtype=D64, requires_grad=False):
    b, H, W, ws, hd, nh, nl, pad = case
    ph, pw = -(-H // ws), -(-W // ws)
    make = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    hi = make(b, H, W, 3 * nh * hd) if nh else None
    lq = make(b, H, W, nl * hd) if nl else None
    lkv = make(b, ph, pw, 2 * nl * hd) if nl else None
    p = make(2 * nh * hd) if nh and pad else None
    return hi, lq, lkv, p


def _op_id(c):
    return "B{}-{}x{}-ws{}-hd{}-hi{}-lo{}-pad{}".format(*c)


@pytest.mark.parametrize("case", OP_CASES, ids=_op_id)
def test_op_float64_matches_boundary_reference_every_level(simd_level, case):
    ws, hd = case[3], case[4]
    hi, lq, lkv, pad = _op_inputs(case, requires_grad=True)
    scale = 0.8 / math.sqrt(hd)
    got = fastattn.hilo_attention(hi, lq, lkv, ws, hd, scale, hi_pad_kv=pad, return_lse=True)
    want = boundary_reference(hi, lq, lkv, ws, hd, scale, pad)
    for a, e in zip(got, want):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)
    outs = [(a, e) for a, e in zip(got[:2], want[:2]) if a is not None]
    gs = [torch.randn_like(e) for _, e in outs]
    inputs = [t for t in (hi, lq, lkv, pad) if t is not None]
    got_g = torch.autograd.grad([a for a, _ in outs], inputs, gs)
    want_g = torch.autograd.grad([e for _, e in outs], inputs, gs)
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", [OP_CASES[1], OP_CASES[2], OP_CASES[5], (1, 3, 4, 2, 3, 1, 2, True)], ids=_op_id)
def test_gradcheck(case):
    ws, hd = case[3], case[4]
    hi, lq, lkv, pad = _op_inputs(case, requires_grad=True)
    names = [n for n, t in zip(("hi", "lq", "lkv", "pad"), (hi, lq, lkv, pad)) if t is not None]
    tensors = [t for t in (hi, lq, lkv, pad) if t is not None]

    def f(*ts):
        kw = dict(zip(names, ts))
        h, lo = fastattn.hilo_attention(kw.get("hi"), kw.get("lq"), kw.get("lkv"), ws, hd, 0.7,
                                        hi_pad_kv=kw.get("pad"))
        return tuple(t for t in (h, lo) if t is not None)

    assert torch.autograd.gradcheck(f, tensors)


def test_many_pooled_keys_take_the_dense_path_and_match():
    # 33 × 33 pooled keys: past the few-keys path's limit, the dense attention kernel runs
    case = (1, 66, 65, 2, 8, 1, 2, True)
    hi, lq, lkv, pad = _op_inputs(case, requires_grad=True)
    got = fastattn.hilo_attention(hi, lq, lkv, 2, 8, 0.4, hi_pad_kv=pad)
    want = boundary_reference(hi, lq, lkv, 2, 8, 0.4, pad)[:2]
    g = [torch.randn_like(w) for w in want]
    for a, e in zip(torch.autograd.grad(got, (hi, lq, lkv, pad), g), torch.autograd.grad(want, (hi, lq, lkv, pad), g)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-6), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_op_lower_precision_accumulates_in_float32(simd_level, dtype, tol):
    case = (2, 9, 7, 2, 16, 2, 3, True)
    inputs = _op_inputs(case)
    low = [t.to(dtype) if t is not None else None for t in inputs]
    got = fastattn.hilo_attention(*low[:3], 2, 16, hi_pad_kv=low[3], return_lse=True)
    want = boundary_reference(*[t.double() for t in low[:3]], 2, 16, 0.25, low[3].double())
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    for a, e in zip(got, want):
        assert (a.double() - e).abs().max() <= tol * (1 + e.abs().max())
