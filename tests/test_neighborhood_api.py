"""Neighborhood attention's integration: torch ops (opcheck, compile, autograd Function), the
nn modules against NATTEN's, the numpy API, and errors on bad input."""

import numpy as np
import pytest
import torch

import fastattn
from fastattn.reference import neighborhood_attention as ref_na

WINDOW = ([3, 4], [1, 2], [2, 1], [False, True], 0.4)


def _qkv(spatial=(7, 9), hq=4, hkv=2, d=8, dv=6, dtype=torch.float32, extra=0):
    q = torch.randn(2, *spatial, hq, d, dtype=dtype)
    k = torch.randn(2, *spatial, hkv, d, dtype=dtype)
    v = torch.randn(2, *spatial, hkv, dv, dtype=dtype)
    if not extra:
        return q, k, v, None, None
    return q, k, v, torch.randn(2, extra, hkv, d, dtype=dtype), torch.randn(2, extra, hkv, dv, dtype=dtype)


# --- torch integration ----------------------------------------------------------------------


@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_forward_and_backward_ops(extra, dtype):
    q, k, v, ak, av = _qkv(dtype=dtype, extra=extra)
    grad = dtype != torch.bfloat16
    args = tuple(None if t is None else t.requires_grad_(grad) for t in (q, k, v, ak, av))
    torch.library.opcheck(torch.ops.fastattn.na_fwd.default, (*args, *WINDOW))
    plain = tuple(None if t is None else t.detach() for t in args)
    out, lse = torch.ops.fastattn.na_fwd(*plain, *WINDOW)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastattn.na_bwd.default, (dout, *plain, out, lse, *WINDOW))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(backend, compiled_matches_eager):
    def f(q, k, v, ak, av):
        out = fastattn.na2d(q * 2, k, v, (3, 5), stride=(1, 2), is_causal=(True, False),
                            additional_keys=ak, additional_values=av)
        return out.sin().sum()

    compiled_matches_eager(f, [t.requires_grad_(True) for t in _qkv(extra=2)], backend)


def test_autograd_function_matches_reference():
    q, k, v, ak, av = (t.double().requires_grad_(True) for t in _qkv(spatial=(5, 6), d=3, dv=2, extra=2))
    fn = fastattn.NeighborhoodAttentionFunction
    assert fastattn.autograd.NeighborhoodAttentionFunction is fn
    out = fn.apply(q, k, v, 3, 1, (1, 2), (False, True), 0.5, ak, av)
    want = ref_na(q, k, v, 3, 1, (1, 2), (False, True), 0.5, ak, av)
    torch.testing.assert_close(out, want)
    assert torch.autograd.gradcheck(lambda *a: fn.apply(*a[:3], 3, 1, (1, 2), (False, True), 0.5, *a[3:]),
                                    (q, k, v, ak, av))
    q2 = q.detach().requires_grad_(True)
    fn.apply(q2, k.detach(), v.detach(), 3).sum().backward()
    assert q2.grad is not None


def test_rank_specific_functions_and_lse():
    q, k, v, _, _ = _qkv(spatial=(10,))
    out, lse = fastattn.na1d(q, k, v, 4, return_lse=True)
    assert out.shape == (2, 10, 4, 6) and lse.shape == (2, 10, 4) and not lse.requires_grad
    with pytest.raises(ValueError, match="query must be 5-D"):
        fastattn.na2d(q, k, v, 4)
    q3, k3, v3, _, _ = _qkv(spatial=(3, 4, 5))
    assert fastattn.na3d(q3, k3, v3, 3).shape == (2, 3, 4, 5, 4, 6)
    torch.testing.assert_close(fastattn.neighborhood_attention(q3, k3, v3, 3), fastattn.na3d(q3, k3, v3, 3))


def test_meta_tensors_use_the_fake_impl():
    q, k, v, ak, av = (t.to("meta") for t in _qkv(dtype=torch.bfloat16, extra=2))
    out, lse = fastattn.na2d(q, k, v, 3, additional_keys=ak, additional_values=av, return_lse=True)
    assert out.shape == (2, 7, 9, 4, 6) and out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_cuda_slot_is_registered():
    for op in ("fastattn::na_fwd", "fastattn::na_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def test_non_contiguous_inputs():
    q, k, v, _, _ = _qkv(spatial=(8, 6))
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(fastattn.na2d(qt, kt, vt, 3), fastattn.na2d(q, k, v, 3), atol=0, rtol=0)


def test_empty_batch():
    q, k, v, _, _ = _qkv()
    q, k, v = (t[:0].requires_grad_(True) for t in (q, k, v))
    out = fastattn.na2d(q, k, v, 3)
    assert out.shape == (0, 7, 9, 4, 6)
    out.sum().backward()
    assert q.grad.shape == q.shape


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(kernel_size=1), ValueError, "kernel_size must be >= 2"),
        (dict(kernel_size=3, dilation=0), ValueError, "dilation"),
        (dict(kernel_size=3, stride=4), ValueError, "stride"),
        (dict(kernel_size=5, dilation=2), ValueError, "exceeds the input size"),
        (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size has 3 entries"),
        (dict(kernel_size=3, is_causal=1), ValueError, "is_causal"),
        (dict(kernel_size=3.0), ValueError, "kernel_size must be an int"),
        (dict(kernel_size=3, scale="x"), TypeError, "scale"),
    ],
)
def test_bad_arguments_raise_named_errors(kwargs, err, match):
    q, k, v, _, _ = _qkv()
    with pytest.raises(err, match=match):
        fastattn.neighborhood_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "make,err,match",
    [
        (lambda q, k, v: (q[..., :4], k, v), ValueError, "key head_dim"),
        (lambda q, k, v: (q, k[:, :, :5], v), ValueError, "key batch/spatial shape"),
        (lambda q, k, v: (q[:, :, :, :3], k, v), ValueError, "multiple of key/value heads"),
        (lambda q, k, v: (q, k, v[..., :1, :]), ValueError, "head counts differ"),
        (lambda q, k, v: (q[0], k, v), ValueError, "key must have the rank"),
        (lambda q, k, v: (q.double(), k, v), TypeError, "dtype"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "dtype"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "query must be a torch.Tensor"),
        (lambda q, k, v: (q.reshape(2, 63, 4, 8)[..., None, :, :][..., :0, :, :], k, v), ValueError, "query"),
    ],
)
def test_bad_shapes_and_dtypes_raise_named_errors(make, err, match):
    q, k, v, _, _ = _qkv()
    with pytest.raises(err, match=match):
        fastattn.neighborhood_attention(*make(q, k, v), 3)


def test_bad_additional_keys_raise_named_errors():
    q, k, v, ak, av = _qkv(extra=3)
    with pytest.raises(ValueError, match="given together"):
        fastattn.na2d(q, k, v, 3, additional_keys=ak)
    with pytest.raises(ValueError, match="additional_values must be"):
        fastattn.na2d(q, k, v, 3, additional_keys=ak, additional_values=av[..., :2])
    with pytest.raises(ValueError, match="lengths differ"):
        fastattn.na2d(q, k, v, 3, additional_keys=ak, additional_values=av[:, :2])
    with pytest.raises(TypeError, match="additional_keys has dtype"):
        fastattn.na2d(q, k, v, 3, additional_keys=ak.double(), additional_values=av)


# --- nn modules ---------------------------------------------------------------------------------


def _ref_module_forward(m, x):
    """NATTEN's module forward written out with the reference op."""
    b, *spatial, c = x.shape
    qkv = m.qkv(x).reshape(b, *spatial, 3, m.num_heads, c // m.num_heads)
    q, k, v = qkv.unbind(len(spatial) + 1)
    y = ref_na(q, k, v, m.kernel_size, m.stride, m.dilation, m.is_causal, m.scale)
    return m.proj(y.reshape(b, *spatial, c))


@pytest.mark.parametrize(
    "cls,spatial,kw",
    [
        ("NeighborhoodAttention1D", (21,), dict(kernel_size=5, dilation=2, is_causal=True)),
        ("NeighborhoodAttention2D", (9, 10), dict(kernel_size=(3, 5), stride=(1, 2), qkv_bias=False)),
        ("NeighborhoodAttention3D", (4, 5, 6), dict(kernel_size=3, qk_scale=0.2)),
    ],
)
def test_modules_match_reference_and_train(cls, spatial, kw):
    m = getattr(fastattn.nn, cls)(embed_dim=24, num_heads=3, **kw).double()
    x = torch.randn(2, *spatial, 24, dtype=torch.float64, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, _ref_module_forward(m, x))
    y.square().sum().backward()
    assert m.qkv.weight.grad is not None and x.grad is not None
    assert sorted(m.state_dict()) == sorted(
        ["qkv.weight", "proj.weight", "proj.bias"] + ([] if kw.get("qkv_bias") is False else ["qkv.bias"])
    )


def test_module_errors():
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.nn.NeighborhoodAttention2D(embed_dim=10, num_heads=3, kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size has 3 entries"):
        fastattn.nn.NeighborhoodAttention2D(embed_dim=12, num_heads=3, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match="stride"):
        fastattn.nn.NeighborhoodAttention1D(embed_dim=12, num_heads=3, kernel_size=3, stride=4)
    m = fastattn.nn.NeighborhoodAttention2D(embed_dim=12, num_heads=3, kernel_size=3)
    with pytest.raises(ValueError, match="rank 4"):
        m(torch.randn(1, 5, 12))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 5, 5, 10))


@pytest.mark.peer
@pytest.mark.parametrize(
    "rank,spatial,kw",
    [
        (1, (40,), dict(kernel_size=7, dilation=2)),
        (2, (14, 15), dict(kernel_size=(5, 3), stride=(2, 1), is_causal=(False, True))),
        (3, (6, 6, 7), dict(kernel_size=3, qkv_bias=False)),
    ],
)
def test_natten_state_dict_loads_and_gives_same_output(rank, spatial, kw):
    natten = pytest.importorskip("natten")
    theirs = getattr(natten, f"NeighborhoodAttention{rank}D")(embed_dim=64, num_heads=2, **kw).eval()
    ours = getattr(fastattn.nn, f"NeighborhoodAttention{rank}D")(embed_dim=64, num_heads=2, **kw).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, *spatial, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-4)


# --- numpy API --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_numpy_forward_and_backward_match_torch(dtype):
    tq, tk, tv, tak, tav = _qkv(extra=2)
    q, k, v, ak, av = (t.numpy().astype(dtype) for t in (tq, tk, tv, tak, tav))
    out, lse = fastattn.numpy.neighborhood_attention(q, k, v, *WINDOW, additional_keys=ak, additional_values=av,
                                                     return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    leaves = [torch.from_numpy(a).requires_grad_(True) for a in (q, k, v, ak, av)]
    want, want_lse = fastattn.neighborhood_attention(*leaves[:3], *WINDOW, additional_keys=leaves[3],
                                                     additional_values=leaves[4], return_lse=True)
    np.testing.assert_array_equal(out, want.detach().numpy())
    np.testing.assert_array_equal(lse, want_lse.numpy())
    dout = np.random.default_rng(0).standard_normal(out.shape).astype(dtype)
    grads = fastattn.numpy.neighborhood_attention_backward(dout, q, k, v, out, lse, *WINDOW, additional_keys=ak,
                                                           additional_values=av)
    want_grads = torch.autograd.grad(want, leaves, torch.from_numpy(dout))
    for name, g, w in zip(("dq", "dk", "dv", "dak", "dav"), grads, want_grads):
        if name in ("dak", "dav"):  # summed per thread: equal up to summation order
            tol = 8 * np.finfo(dtype).eps
            np.testing.assert_allclose(g, w.numpy(), rtol=tol, atol=tol * np.abs(w.numpy()).max())
        else:
            np.testing.assert_array_equal(g, w.numpy())
    no_extra = fastattn.numpy.neighborhood_attention_backward(
        dout, q, k, v, *fastattn.numpy.neighborhood_attention(q, k, v, 3, return_lse=True), 3)
    assert no_extra[3] is None and no_extra[4] is None and no_extra[0].shape == q.shape


def test_numpy_bad_input():
    q, k, v, _, _ = (None if t is None else t.numpy() for t in _qkv())
    with pytest.raises(TypeError, match="query must be a numpy.ndarray"):
        fastattn.numpy.neighborhood_attention(torch.from_numpy(q), k, v, 3)
    with pytest.raises(ValueError, match="stride"):
        fastattn.numpy.neighborhood_attention(q, k, v, 3, stride=5)
    out, lse = fastattn.numpy.neighborhood_attention(q, k, v, 3, return_lse=True)
    with pytest.raises(ValueError, match="lse must be"):
        fastattn.numpy.neighborhood_attention_backward(out, q, k, v, out, lse[..., :1], 3)
    with pytest.raises(ValueError, match="dout must have shape"):
        fastattn.numpy.neighborhood_attention_backward(out[:1], q, k, v, out, lse, 3)


def test_forward_memory_is_not_n_times_window():
    """The forward's extra memory stays O(N·H): a window matrix here would be 63 MB."""
    import subprocess
    import sys

    code = """
import resource, torch, fastattn
torch.manual_seed(0)
q, k, v = (torch.randn(1, 128, 128, 1, 16) for _ in range(3))
fastattn.na2d(q[:, :40, :40], k[:, :40, :40], v[:, :40, :40], 31)  # warm-up: pool, tiles
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = fastattn.na2d(q, k, v, 31)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    grown = int(res.stdout.split()[-1])
    window_matrix = 128 * 128 * 31 * 31 * 4
    assert grown < window_matrix // 4, (grown, window_matrix)


def test_backward_is_deterministic():
    """Bitwise equal gradients run to run (key/value sums in a fixed order; the additional
    keys' gradients, summed per thread, are documented as not bitwise stable)."""
    q, k, v, _, _ = (None if t is None else t.requires_grad_(True) for t in _qkv(spatial=(40, 37), d=32, dv=32))
    runs = []
    for _ in range(4):
        out = fastattn.na2d(q, k, v, 7, dilation=2)
        runs.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)
