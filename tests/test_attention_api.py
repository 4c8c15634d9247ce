"""Dense attention's integration: torch ops (opcheck, compile, autograd Function), the numpy
API, runtime controls, and the behaviour on bad or unusual input."""

import threading

import numpy as np
import pytest
import torch

import fastattn
from fastattn import _fastattn
from fastattn.reference import attention as ref_attention


def _qkv(b=1, tq=9, tk=11, hq=4, hkv=2, d=8, dv=6, dtype=torch.float32):
    return (
        torch.randn(b, tq, hq, d, dtype=dtype),
        torch.randn(b, tk, hkv, d, dtype=dtype),
        torch.randn(b, tk, hkv, dv, dtype=dtype),
    )


# --- torch integration ------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_forward_and_backward_ops(causal, dtype):
    q, k, v = (t.requires_grad_(dtype != torch.bfloat16) for t in _qkv(dtype=dtype))
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, (q, k, v, 0.35, causal))
    out, lse = torch.ops.fastattn.attention_fwd(q.detach(), k.detach(), v.detach(), 0.35, causal)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.fastattn.attention_bwd.default,
        (dout, q.detach(), k.detach(), v.detach(), out, lse, 0.35, causal),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(backend, compiled_matches_eager):
    def f(q, k, v):
        return fastattn.attention(q * 2, k, v, is_causal=True).sin().sum()

    compiled_matches_eager(f, [t.requires_grad_(True) for t in _qkv()], backend)


def test_autograd_function_matches_op_and_reference():
    q, k, v = (t.double().requires_grad_(True) for t in _qkv())
    out = fastattn.AttentionFunction.apply(q, k, v, True, 0.5)
    assert fastattn.autograd.AttentionFunction is fastattn.AttentionFunction
    torch.testing.assert_close(out, ref_attention(q, k, v, is_causal=True, scale=0.5))
    assert torch.autograd.gradcheck(lambda q, k, v: fastattn.AttentionFunction.apply(q, k, v, True, 0.5), (q, k, v))


def test_lse_is_returned_without_grad():
    q, k, v = (t.requires_grad_(True) for t in _qkv())
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    assert lse.shape == (1, 9, 4)


def test_meta_tensors_use_the_fake_impl():
    q, k, v = (t.to("meta") for t in _qkv(dtype=torch.bfloat16))
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    assert out.shape == (1, 9, 4, 6) and out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_cuda_slot_is_registered_and_import_needs_no_cuda():
    for op in ("fastattn::attention_fwd", "fastattn::attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    from fastattn._torch import no_cuda_kernel

    with pytest.raises(NotImplementedError, match="no CUDA kernel"):
        no_cuda_kernel("attention_fwd")()


# --- numpy API ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_numpy_api_matches_torch(dtype):
    q, k, v = (t.numpy().astype(dtype) for t in _qkv())
    out, lse = fastattn.numpy.attention(q, k, v, is_causal=True, return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    want, want_lse = fastattn.attention(*(torch.from_numpy(a) for a in (q, k, v)), is_causal=True, return_lse=True)
    np.testing.assert_array_equal(out, want.numpy())
    np.testing.assert_array_equal(lse, want_lse.numpy())

    dout = np.random.default_rng(0).standard_normal(out.shape).astype(dtype)
    grads = fastattn.numpy.attention_backward(dout, q, k, v, out, lse, is_causal=True)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_(dtype != np.float16) for a in (q, k, v))
    if dtype != np.float16:
        fastattn.attention(tq, tk, tv, is_causal=True).backward(torch.from_numpy(dout))
        for g, t in zip(grads, (tq, tk, tv)):
            np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_numpy_api_accepts_non_contiguous_and_rejects_bad_input():
    q, k, v = (t.numpy() for t in _qkv(tq=11, tk=11))
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not qt.flags.c_contiguous
    np.testing.assert_array_equal(fastattn.numpy.attention(qt, k, v), fastattn.numpy.attention(q, k, v))
    with pytest.raises(TypeError, match="k has dtype float64"):
        fastattn.numpy.attention(q, k.astype(np.float64), v)
    with pytest.raises(TypeError, match="int32"):
        fastattn.numpy.attention(q.astype(np.int32), k, v)
    with pytest.raises(ValueError, match="v must be 4-D"):
        fastattn.numpy.attention(q, k, v[0])
    with pytest.raises(TypeError, match="numpy.ndarray"):
        fastattn.numpy.attention(torch.from_numpy(q), k, v)


# --- bad and unusual input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q, k[..., :5], v), ValueError, "k head_dim 5 differs"),
        (lambda q, k, v: (q, k, v[:, :3]), ValueError, "sequence lengths differ"),
        (lambda q, k, v: (q, torch.cat([k, k], 0), v), ValueError, "batch sizes differ"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of"),
        (lambda q, k, v: (q, k, v[:, :, :1]), ValueError, "head counts differ"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "k has dtype float64"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q has dtype int32"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v is on meta"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_named_error(make, err, match):
    with pytest.raises(err, match=match):
        fastattn.attention(*make(*_qkv()))


def test_bad_arguments_raise_named_error():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="is_causal"):
        fastattn.attention(q, k, v, is_causal="yes")
    with pytest.raises(TypeError, match="scale"):
        fastattn.attention(q, k, v, scale="big")


def test_non_contiguous_and_requires_grad_inputs():
    q, k, v = _qkv(tq=12, tk=12)
    base = fastattn.attention(q, k, v)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    torch.testing.assert_close(fastattn.attention(qt, kt, v), base, atol=0, rtol=0)
    qg = q.clone().requires_grad_(True)
    torch.testing.assert_close(fastattn.attention(qg, k, v).detach(), base, atol=0, rtol=0)


@pytest.mark.parametrize(
    "shape",
    [(0, 5, 5, 2, 2, 4, 4), (1, 0, 5, 2, 2, 4, 4), (1, 5, 0, 2, 2, 4, 4), (1, 5, 5, 0, 0, 4, 4), (1, 5, 5, 2, 2, 4, 0)],
)
def test_empty_dimensions(shape):
    b, tq, tk, hq, hkv, d, dv = shape
    q, k, v = (t.requires_grad_(True) for t in _qkv(b, tq, tk, hq, hkv, d, dv))
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    assert out.shape == (b, tq, hq, dv) and lse.shape == (b, tq, hq)
    assert torch.all(out == 0)
    if tk == 0:
        assert torch.all(lse == float("-inf"))
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.all(torch.isfinite(q.grad))


def test_causal_queries_without_keys_give_zero_and_finite_grads():
    q, k, v = (t.requires_grad_(True) for t in _qkv(tq=10, tk=4))
    out, lse = fastattn.attention(q, k, v, is_causal=True, return_lse=True)
    assert torch.all(out[:, :6] == 0) and torch.all(lse[:, :6] == float("-inf"))
    assert torch.all(out[:, 6:] != 0)
    out.sum().backward()
    assert torch.all(q.grad[:, :6] == 0)
    assert all(torch.all(torch.isfinite(t.grad)) for t in (q, k, v))


def test_nan_propagates_only_where_it_reaches():
    q, k, v = _qkv(hq=2, hkv=2)
    q[0, 3, 1, 0] = float("nan")
    out = fastattn.attention(q, k, v)
    assert torch.all(torch.isnan(out[0, 3, 1]))
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, 3, 1] = False
    assert torch.all(torch.isfinite(out[mask]))


# --- runtime controls -----------------------------------------------------------------------


def test_simd_level_control():
    levels = fastattn.simd_levels()
    assert levels[0] == "scalar"
    try:
        for level in levels:
            assert fastattn.set_simd_level(level) == level
            assert fastattn.simd_level() == level
    finally:
        fastattn.set_simd_level(None)
    assert fastattn.simd_level() == levels[-1]
    with pytest.raises(ValueError, match="unknown SIMD level"):
        fastattn.set_simd_level("sse9")
    unavailable = [lv for lv in ("avx2", "avx512", "neon") if lv not in levels]
    for lv in unavailable:
        with pytest.raises(ValueError, match="not available"):
            fastattn.set_simd_level(lv)


def test_rust_panic_becomes_python_exception():
    with pytest.raises(RuntimeError, match="deliberate test panic"):
        _fastattn._panic_in_kernel_for_tests(2)
    # The pool survives: a normal call still works afterwards.
    q, k, v = _qkv()
    assert torch.isfinite(fastattn.attention(q, k, v)).all()


def test_concurrent_calls_from_python_threads():
    inputs = [_qkv(tq=64, tk=64) for _ in range(4)]
    want = [fastattn.attention(*x) for x in inputs]
    got = [None] * 4

    def work(i):
        got[i] = fastattn.attention(*inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_release_memory_then_compute_again():
    q, k, v = _qkv(tq=300, tk=300)
    before = fastattn.attention(q, k, v)
    fastattn.release_memory()
    torch.testing.assert_close(fastattn.attention(q, k, v), before, atol=0, rtol=0)
