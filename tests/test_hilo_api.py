"""HiLo's integration: torch ops (opcheck, compile, autograd Function), the numpy API and bad
input."""

import numpy as np
import pytest
import torch

import fastattn


def _inputs(b=1, H=5, W=7, ws=2, hd=4, nh=2, nl=3, dtype=torch.float32, pad=True):
    ph, pw = -(-H // ws), -(-W // ws)
    return (torch.randn(b, H, W, 3 * nh * hd, dtype=dtype), torch.randn(b, H, W, nl * hd, dtype=dtype),
            torch.randn(b, ph, pw, 2 * nl * hd, dtype=dtype), torch.randn(2 * nh * hd, dtype=dtype) if pad else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pad", [False, True])
def test_opcheck_forward_and_backward_ops(dtype, pad):
    hi, lq, lkv, p = _inputs(dtype=dtype, pad=pad)
    grad = dtype != torch.bfloat16
    args = [t.requires_grad_(grad) if t is not None else None for t in (hi, p, lq, lkv)]
    torch.library.opcheck(torch.ops.fastattn.hilo_fwd.default, (*args, 2, 4, 0.5))
    detached = [t.detach() if t is not None else None for t in args]
    h, lo, lse = torch.ops.fastattn.hilo_fwd(*detached, 2, 4, 0.5)
    torch.library.opcheck(torch.ops.fastattn.hilo_bwd.default,
                          (torch.randn_like(h), torch.randn_like(lo), *detached, lo, lse, 2, 4, 0.5))


def test_opcheck_with_one_branch_absent():
    hi, lq, lkv, _ = _inputs()
    torch.library.opcheck(torch.ops.fastattn.hilo_fwd.default, (None, None, lq.requires_grad_(), lkv, 2, 4, 0.5))
    torch.library.opcheck(torch.ops.fastattn.hilo_fwd.default, (hi.requires_grad_(), None, None, None, 2, 4, 0.5))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(backend, compiled_matches_eager):
    def f(hi, lq, lkv, p):
        h, lo = fastattn.hilo_attention(hi * 2, lq, lkv, 2, 4, hi_pad_kv=p)
        return h.sin().sum() + lo.cos().sum()

    compiled_matches_eager(f, [t.requires_grad_(True) for t in _inputs()], backend)


def test_compile_module_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    m = fastattn.nn.HiLo(24, 4, True, window_size=2, alpha=0.5)
    x = torch.randn(2, 5 * 7, 24, requires_grad=True)
    got = torch.compile(m, fullgraph=True)(x, 5, 7)
    want = m(x, 5, 7)
    torch.testing.assert_close(got, want)
    (gc,) = torch.autograd.grad(got.sum(), x)
    (ge,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gc, ge)


def test_autograd_function_matches_op_and_gradchecks():
    hi, lq, lkv, p = (t.double().requires_grad_(True) for t in _inputs(H=3, W=5, hd=3, nh=1, nl=2))
    assert fastattn.autograd.HiLoAttentionFunction is fastattn.HiLoAttentionFunction
    got = fastattn.HiLoAttentionFunction.apply(hi, lq, lkv, 2, 3, None, p)
    want = fastattn.hilo_attention(hi, lq, lkv, 2, 3, hi_pad_kv=p)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(lambda *ts: fastattn.HiLoAttentionFunction.apply(*ts[:3], 2, 3, 0.6, ts[3]),
                                    (hi, lq, lkv, p))
    h, lo = fastattn.HiLoAttentionFunction.apply(None, lq, lkv, 2, 3)
    assert h is None and lo.shape == (1, 3, 5, 6)


def test_meta_tensors_use_the_fake_impl():
    hi, lq, lkv, p = (t.to("meta") for t in _inputs(dtype=torch.bfloat16))
    h, lo, lse = fastattn.hilo_attention(hi, lq, lkv, 2, 4, hi_pad_kv=p, return_lse=True)
    assert h.shape == (1, 5, 7, 8) and lo.shape == (1, 5, 7, 12) and lse.shape == (1, 35, 3)
    assert h.dtype == torch.bfloat16 and lse.dtype == torch.float32 and h.device.type == "meta"


def test_an_absent_branch_is_none():
    hi, lq, lkv, p = _inputs()
    h, lo = fastattn.hilo_attention(hi, None, None, 2, 4, hi_pad_kv=p)
    assert lo is None and h.shape == (1, 5, 7, 8)
    h, lo, lse = fastattn.hilo_attention(None, lq, lkv, 2, 4, return_lse=True)
    assert h is None and lo.shape == (1, 5, 7, 12) and lse.shape == (1, 35, 3)


def test_strided_inputs_are_accepted():
    hi, lq, lkv, p = _inputs()
    wide = torch.randn(1, 5, 7, 40)
    wide[..., 5:29] = hi
    got = fastattn.hilo_attention(wide[..., 5:29], lq, lkv, 2, 4, hi_pad_kv=p)
    want = fastattn.hilo_attention(hi, lq, lkv, 2, 4, hi_pad_kv=p)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("pad", [False, True])
def test_numpy_matches_torch(dtype, pad):
    hi, lq, lkv, p = (None if t is None else t.numpy().astype(dtype) for t in _inputs(pad=pad))
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    h, lo, lse = fastattn.numpy.hilo_attention(hi, lq, lkv, 2, 4, hi_pad_kv=p, return_lse=True)
    wh, wlo, wlse = fastattn.hilo_attention(t(hi), t(lq), t(lkv), 2, 4, hi_pad_kv=t(p), return_lse=True)
    for a, e in ((h, wh), (lo, wlo), (lse, wlse)):
        np.testing.assert_array_equal(a, e.numpy())
    dh, dlo = np.random.randn(*h.shape).astype(dtype), np.random.randn(*lo.shape).astype(dtype)
    got = fastattn.numpy.hilo_attention_backward(dh, dlo, hi, lq, lkv, lo, lse, 2, 4, hi_pad_kv=p)
    want = torch.ops.fastattn.hilo_bwd(t(dh), t(dlo), t(hi), t(p), t(lq), t(lkv), t(lo), t(lse), 2, 4, 0.5)
    for a, e in zip(got, (want[0], want[2], want[3], want[1])):
        if a is None:
            assert not pad and e.numel() == 0
        else:
            np.testing.assert_array_equal(a, e.numpy())


def test_numpy_one_branch():
    _, lq, lkv, _ = (None if t is None else t.numpy() for t in _inputs())
    h, lo = fastattn.numpy.hilo_attention(None, lq, lkv, 2, 4)
    assert h is None and lo.shape == lq.shape
    with pytest.raises(ValueError, match="d_hi_out"):
        fastattn.numpy.hilo_attention_backward(np.zeros((1, 5, 7, 8), np.float32), lo, None, lq, lkv, lo,
                                               np.zeros((1, 35, 3), np.float32), 2, 4)
    with pytest.raises(ValueError, match="lo_lse"):
        fastattn.numpy.hilo_attention_backward(None, lo, None, lq, lkv, lo, np.zeros((1, 35), np.float32), 2, 4)


@pytest.mark.parametrize(
    "kw, exc, msg",
    [
        (dict(window_size=9), ValueError, "window_size"),
        (dict(window_size=0), ValueError, "window_size"),
        (dict(window_size=2.0), ValueError, "window_size"),
        (dict(window_size=True), ValueError, "window_size"),
        (dict(head_dim=0), ValueError, "head_dim"),
        (dict(head_dim=5), ValueError, "head_dim"),
        (dict(head_dim="4"), ValueError, "head_dim"),
        (dict(hi_qkv=None, lo_q=None, lo_kv=None, hi_pad_kv=None), ValueError, "at least one branch"),
        (dict(lo_kv=None), ValueError, "lo_q and lo_kv"),
        (dict(lo_kv=torch.randn(1, 3, 3, 24)), ValueError, "lo_kv"),
        (dict(lo_q=torch.randn(1, 5, 6, 12)), ValueError, "lo_q"),
        (dict(hi_qkv=torch.randn(1, 5, 7, 0)), ValueError, "pass None"),
        (dict(hi_pad_kv=torch.randn(15)), ValueError, "hi_pad_kv"),
        (dict(hi_qkv=None), ValueError, "hi_pad_kv"),
        (dict(hi_pad_kv=torch.randn(16).double()), TypeError, "hi_pad_kv"),
        (dict(scale="big"), TypeError, "scale"),
        (dict(return_lse="yes"), TypeError, "return_lse"),
    ],
)
def test_bad_inputs_name_the_argument(kw, exc, msg):
    hi, lq, lkv, p = _inputs()
    args = dict(hi_qkv=hi, lo_q=lq, lo_kv=lkv, window_size=2, head_dim=4, hi_pad_kv=p)
    args.update(kw)
    with pytest.raises(exc, match=msg):
        fastattn.hilo_attention(**args)


@pytest.mark.parametrize(
    "build, msg",
    [
        (lambda: fastattn.nn.HiLo(30, 4), "num_heads"),
        (lambda: fastattn.nn.HiLo(32, 0), "num_heads"),
        (lambda: fastattn.nn.HiLo(32, 4, window_size=9), "window_size"),
        (lambda: fastattn.nn.HiLo(32, 4, window_size=0), "window_size"),
        (lambda: fastattn.nn.HiLo(32, 4, alpha=1.5), "alpha"),
        (lambda: fastattn.nn.HiLo(32, 4, alpha="half"), "alpha"),
        (lambda: fastattn.nn.HiLo(0, 4), "dim"),
    ],
)
def test_module_construction_errors(build, msg):
    with pytest.raises(ValueError, match=msg):
        build()


@pytest.mark.parametrize(
    "x, H, W, exc, msg",
    [
        (torch.randn(1, 35, 16), 5, 7, ValueError, "channels"),
        (torch.randn(1, 35, 32), 5, 6, ValueError, "H \\* W"),
        (torch.randn(35, 32), 5, 7, ValueError, "x"),
        (torch.randn(1, 35, 32).int(), 5, 7, TypeError, "x"),
        (torch.randn(1, 35, 32), 0, 7, ValueError, "H"),
        (torch.randn(1, 35, 32), 5, 7.0, ValueError, "W"),
    ],
)
def test_module_forward_errors(x, H, W, exc, msg):
    with pytest.raises(exc, match=msg):
        fastattn.nn.HiLo(32, 4)(x, H, W)


def test_binding_rejects_bad_lengths_without_panic():
    hi, lq, lkv, _ = _inputs()
    outs = torch.empty(1, 5, 7, 8), torch.empty(1, 5, 7, 12), torch.empty(1, 35, 3)
    b = lambda t: (t.data_ptr(), t.numel())  # noqa: E731
    dims = (1, 5, 7, 2, 4, 2, 3)
    with pytest.raises(ValueError, match="lo_kv"):
        fastattn._fastattn.hilo_forward("float32", dims, 0.5, 1, b(hi), None, b(lq), b(lkv[:, :2]), *map(b, outs))
    with pytest.raises(ValueError, match="window"):
        fastattn._fastattn.hilo_forward("float32", (1, 5, 7, 9, 4, 2, 3), 0.5, 1, b(hi), None, b(lq), b(lkv),
                                        *map(b, outs))
