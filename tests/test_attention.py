"""Dense attention: forward and backward against the float64 reference, at every SIMD level."""

import os

import pytest
import torch

import fastattn
from fastattn.reference import attention as ref_attention

# (B, Tq, Tk, Hq, Hkv, D, Dv, causal): T=1, odd T, Tq != Tk both ways, GQA/MQA, Dv != D,
# causal with Tq > Tk (queries that see no key), sizes off every tile multiple.
CASES = [
    (1, 1, 1, 1, 1, 8, 8, False),
    (1, 1, 1, 1, 1, 8, 8, True),
    (2, 17, 17, 4, 4, 32, 32, True),
    (1, 65, 130, 4, 2, 64, 64, False),
    (1, 65, 130, 4, 2, 64, 64, True),
    (1, 130, 65, 4, 2, 64, 64, True),
    (2, 33, 77, 6, 1, 40, 24, True),
    (1, 257, 257, 2, 2, 128, 128, True),
    (1, 3, 300, 2, 1, 7, 5, False),
    (1, 100, 1, 2, 2, 16, 16, False),
    (1, 129, 129, 1, 1, 64, 96, False),
]


def _ids(c):
    b, tq, tk, hq, hkv, d, dv, causal = c
    return f"B{b}-Tq{tq}-Tk{tk}-H{hq}/{hkv}-D{d}-Dv{dv}-{'causal' if causal else 'full'}"


def _inputs(case, dtype=torch.float32, requires_grad=False):
    b, tq, tk, hq, hkv, d, dv, _ = case
    q = torch.randn(b, tq, hq, d).to(dtype)
    k = torch.randn(b, tk, hkv, d).to(dtype)
    v = torch.randn(b, tk, hkv, dv).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _ref(q, k, v, causal, dtype=torch.float64, scale=None):
    return ref_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=causal, scale=scale, return_lse=True)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_fp32_matches_float64_reference(case, simd_level):
    q, k, v = _inputs(case)
    out, lse = fastattn.attention(q, k, v, is_causal=case[-1], return_lse=True)
    ref_out, ref_lse = _ref(q, k, v, case[-1])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert (out.double() - ref_out).abs().max().item() <= 1e-4
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_fp64_matches_reference(case, simd_level):
    q, k, v = _inputs(case, torch.float64)
    out, lse = fastattn.attention(q, k, v, is_causal=case[-1], return_lse=True, scale=0.3)
    ref_out, ref_lse = _ref(q, k, v, case[-1], scale=0.3)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES[2:7], ids=_ids)
def test_forward_half_within_multiple_of_reference_in_dtype(case, dtype, simd_level):
    q, k, v = _inputs(case, dtype)
    out = fastattn.attention(q, k, v, is_causal=case[-1])
    assert out.dtype == dtype
    ref64, _ = _ref(q, k, v, case[-1])
    ref_lowp, _ = _ref(q, k, v, case[-1], dtype=dtype)
    err = (out.double() - ref64).abs().max().item()
    err_lowp = (ref_lowp.double() - ref64).abs().max().item()
    assert err <= 2 * err_lowp + 1e-3, (err, err_lowp)


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_backward_fp32_matches_float64_reference(case, simd_level):
    causal = case[-1]
    q, k, v = _inputs(case)
    b, tq, _, hq, _, _, dv, _ = case
    dout = torch.randn(b, tq, hq, dv)
    _, dq, dk, dv_ = _grads(lambda *a: fastattn.attention(*a, is_causal=causal), q, k, v, dout)
    _, rq, rk, rv = _grads(
        lambda *a: ref_attention(*a, is_causal=causal), q.double(), k.double(), v.double(), dout.double()
    )
    for got, want in ((dq, rq), (dk, rk), (dv_, rv)):
        assert got.dtype == torch.float32
        tol = 2e-4 * max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= tol


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_backward_fp64_matches_reference(case, simd_level):
    causal = case[-1]
    q, k, v = _inputs(case, torch.float64)
    b, tq, _, hq, _, _, dv, _ = case
    dout = torch.randn(b, tq, hq, dv, dtype=torch.float64)
    got = _grads(lambda *a: fastattn.attention(*a, is_causal=causal), q, k, v, dout)
    want = _grads(lambda *a: ref_attention(*a, is_causal=causal), q, k, v, dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_half_close_to_reference(dtype):
    case = (1, 37, 50, 4, 2, 32, 16, True)
    q, k, v = _inputs(case, dtype)
    dout = torch.randn(1, 37, 4, 16).to(dtype)
    got = _grads(lambda *a: fastattn.attention(*a, is_causal=True), q, k, v, dout)
    want = _grads(lambda *a: ref_attention(*a, is_causal=True), q.double(), k.double(), v.double(), dout.double())
    lowp = _grads(lambda *a: ref_attention(*a, is_causal=True), q, k, v, dout)
    for g, w, lp in zip(got[1:], want[1:], lowp[1:]):
        assert g.dtype == dtype
        err = (g.double() - w).abs().max().item()
        err_lowp = (lp.double() - w).abs().max().item()
        assert err <= 2 * err_lowp + 1e-3, (err, err_lowp)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 5, 7, 2, 1, 4, 3), (2, 6, 6, 2, 2, 3, 5), (1, 9, 4, 3, 3, 4, 4)])
def test_gradcheck_float64(shape, causal):
    b, tq, tk, hq, hkv, d, dv = shape
    q = torch.randn(b, tq, hq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, tk, hkv, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, tk, hkv, dv, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: fastattn.attention(q, k, v, is_causal=causal), (q, k, v))


@pytest.mark.extended
@pytest.mark.parametrize("seed", range(200))
def test_random_sweep_extended(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    hkv = r(1, 3)
    case = (r(1, 2), r(1, 300), r(1, 300), hkv * r(1, 3), hkv, r(1, 140), r(1, 140), bool(r(0, 1)))
    test_forward_fp32_matches_float64_reference(case, None)
    test_backward_fp32_matches_float64_reference(case, None)


def test_default_scale_and_explicit_scale():
    q, k, v = _inputs((1, 20, 30, 2, 2, 16, 16, False))
    torch.testing.assert_close(
        fastattn.attention(q, k, v), fastattn.attention(q, k, v, scale=16**-0.5), atol=0, rtol=0
    )
    out = fastattn.attention(q, k, v, scale=0.7)
    ref, _ = _ref(q, k, v, False, scale=0.7)
    assert (out.double() - ref).abs().max().item() <= 1e-4


def test_thread_count_env_gives_same_numbers(monkeypatch):
    q, k, v = _inputs((2, 150, 150, 4, 4, 32, 32, True))
    monkeypatch.setenv("FASTATTN_NUM_THREADS", "1")
    assert fastattn.num_threads() == 1
    one = fastattn.attention(q, k, v, is_causal=True)
    monkeypatch.setenv("FASTATTN_NUM_THREADS", "2")
    two = fastattn.attention(q, k, v, is_causal=True)
    ref, _ = _ref(q, k, v, True)
    assert (one.double() - ref).abs().max() <= 1e-4 and (two.double() - ref).abs().max() <= 1e-4


def test_thread_count_follows_torch(monkeypatch):
    monkeypatch.delenv("FASTATTN_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fastattn.num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert fastattn.num_threads() == before


@pytest.mark.skipif(os.cpu_count() is None, reason="cpu count unknown")
def test_bad_thread_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTATTN_NUM_THREADS", "zero")
    q, k, v = _inputs((1, 4, 4, 1, 1, 4, 4, False))
    with pytest.raises(ValueError, match="FASTATTN_NUM_THREADS"):
        fastattn.attention(q, k, v)
