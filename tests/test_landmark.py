"""Landmark attention's training form (docs/landmark.md): the fused op against the plain
PyTorch oracle in float64 (outputs, lse, gradients) at every SIMD level, on awkward shapes;
lower precisions, gradcheck, the op pattern (opcheck, compile, autograd.Function, numpy) and
the original's head-first entry point."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastattn
from fastattn.landmark import fused_landmark_attention
from fastattn.reference import landmark_attention as ref_train
from fastattn.reference import landmark_retrieval_attention as ref_retrieval

D64 = torch.float64

# (B, Tq, Tk, H, H_kv, D, Dv, block)
CASES = [
    (1, 1, 1, 1, 1, 8, 8, 2),          # T = 1
    (2, 29, 29, 4, 2, 16, 8, 8),       # GQA, Dv < D, T not a multiple of the block
    (1, 13, 13, 2, 2, 8, 8, 16),       # T below one block: no landmark at all
    (1, 40, 40, 3, 1, 4, 12, 5),       # MQA, block not a power of two
    (1, 9, 31, 2, 1, 8, 8, 4),         # Tq < Tk: the queries are the last positions
    (1, 131, 131, 1, 1, 16, 16, 65),   # block 65: two complete blocks and a tail
    (2, 17, 17, 2, 2, 8, 8, 2),        # block 2: one regular token a block
    (1, 64, 64, 2, 2, 32, 32, 64),     # exactly one block: its landmark is the last query
]


def _id(c):
    return "B{}-Tq{}-Tk{}-H{}-{}-D{}-{}-bs{}".format(*c)


def _inputs(case, dtype=D64, grad=False):
    b, tq, tk, h, hkv, d, dv, _ = case
    q = torch.randn(b, tq, h, d, dtype=dtype)
    k = torch.randn(b, tk, hkv, d, dtype=dtype)
    v = torch.randn(b, tk, hkv, dv, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _reference(q, k, v, bs, scale=None):
    """The oracle for any Tq <= Tk: with top_k past the number of blocks, retrieval keeps every
    earlier block, which is the training form for queries at the end of the keys."""
    if q.shape[1] == k.shape[1]:
        return ref_train(q, k, v, bs, scale)
    return ref_retrieval(q, k, v, bs, top_k=k.shape[1], scale=scale)


def _reference_lse(q, k, bs, scale):
    """log Z of every row, from the math: the own block's regular tokens up to the query and
    the landmark of every earlier block."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    pos = torch.arange(tk - tq, tk)[:, None]
    j = torch.arange(tk)[None, :]
    landmark = j % bs == bs - 1
    own = (j // bs == pos // bs) & (j <= pos) & ~landmark
    gate = landmark & (j // bs < pos // bs)
    return torch.logsumexp(s.masked_fill(~(own | gate), float("-inf")), -1).permute(0, 2, 1)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_float64_matches_the_oracle_every_level(simd_level, case):
    bs = case[-1]
    q, k, v = _inputs(case, grad=True)
    scale = 0.8 / case[5] ** 0.5
    out, lse = fastattn.landmark_attention(q, k, v, bs, scale, return_lse=True)
    want = _reference(q, k, v, bs, scale)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, _reference_lse(q, k, bs, scale), rtol=1e-10, atol=1e-12)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(want, (q, k, v), g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]], ids=_id)
def test_gradcheck(case):
    small = case[:5] + (4, 3, case[7])
    q, k, v = _inputs(small, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: fastattn.landmark_attention(q, k, v, small[-1]), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: fastattn.LandmarkAttentionFunction.apply(q, k, v, small[-1], 0.3), (q, k, v))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_lower_precision_accumulates_in_float32(simd_level, dtype, tol):
    case = (2, 45, 45, 4, 2, 16, 16, 8)
    q, k, v = _inputs(case, dtype)
    out, lse = fastattn.landmark_attention(q, k, v, 8, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want = _reference(*(t.to(D64) for t in (q, k, v)), 8)
    torch.testing.assert_close(out.to(D64), want, rtol=tol, atol=tol)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    fastattn.landmark_attention(qg, kg, vg, 8).sum().backward()
    q6, k6, v6 = (t.detach().to(D64).requires_grad_() for t in (q, k, v))
    _reference(q6, k6, v6, 8).sum().backward()
    for a, e in ((qg, q6), (kg, k6), (vg, v6)):
        torch.testing.assert_close(a.grad.to(D64), e.grad, rtol=10 * tol, atol=10 * tol)


def test_opcheck_forward_and_backward():
    q, k, v = _inputs(CASES[1], torch.float32, grad=True)
    torch.library.opcheck(torch.ops.fastattn.landmark_fwd, (q, k, v, 8, 0.25))
    out, lse = torch.ops.fastattn.landmark_fwd(q, k, v, 8, 0.25)
    torch.library.opcheck(torch.ops.fastattn.landmark_bwd,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, 8, 0.25))


def test_compile_fullgraph_forward_and_backward():
    q, k, v = _inputs(CASES[3], torch.float32, grad=True)

    def f(q, k, v):
        return fastattn.landmark_attention(q, k, v, 5).square().sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v)
    exp = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(got, want)
    for a, e in zip(grads, exp):
        torch.testing.assert_close(a, e)


def test_meta_tensors_give_shapes():
    q, k, v = (torch.empty(2, 7, 4, 8, device="meta"), torch.empty(2, 9, 2, 8, device="meta"),
               torch.empty(2, 9, 2, 5, device="meta"))
    out, lse = fastattn.landmark_attention(q, k, v, 4, return_lse=True)
    assert out.shape == (2, 7, 4, 5) and lse.shape == (2, 7, 4) and lse.dtype == torch.float32


def test_numpy_matches_torch_forward_and_backward():
    q, k, v = _inputs(CASES[4], torch.float32)
    out, lse = fastattn.landmark_attention(q, k, v, 4, return_lse=True)
    n_out, n_lse = fastattn.numpy.landmark_attention(q.numpy(), k.numpy(), v.numpy(), 4, return_lse=True)
    np.testing.assert_array_equal(n_out, out.numpy())
    np.testing.assert_array_equal(n_lse, lse.numpy())
    g = torch.randn_like(out)
    dq, dk, dv = torch.ops.fastattn.landmark_bwd(g, q, k, v, out, lse, 4, q.shape[-1] ** -0.5)
    n = fastattn.numpy.landmark_attention_backward(g.numpy(), q.numpy(), k.numpy(), v.numpy(), n_out, n_lse, 4)
    for a, e in zip(n, (dq, dk, dv)):
        np.testing.assert_array_equal(a, e.numpy())


def test_fused_landmark_attention_is_the_head_first_form():
    b, h, t, d, bs = 2, 3, 37, 8, 6
    q, k, v = (torch.randn(b, h, t, d, dtype=D64, requires_grad=True) for _ in range(3))
    is_mem = (torch.arange(t) % bs == bs - 1).expand(b, t)
    out = fused_landmark_attention(q, k, v, is_mem, sm_scale=0.4, block_size=bs)
    want = ref_train(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bs, 0.4).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fused_landmark_attention(q, k, v, is_mem[0, :13], block_size=bs),
        tuple(x.detach()[:1, :1, :13].requires_grad_() for x in (q, k, v)))
    wrong = is_mem.clone()
    wrong[0, 0] = True
    with pytest.raises(ValueError, match="is_mem must mark exactly"):
        fused_landmark_attention(q, k, v, wrong, block_size=bs)
    with pytest.raises(ValueError, match="is_mem must be"):
        fused_landmark_attention(q, k, v, is_mem[:, :5], block_size=bs)
    with pytest.raises(TypeError, match="is_mem"):
        fused_landmark_attention(q, k, v, is_mem.int(), block_size=bs)


@pytest.mark.parametrize("kw,exc,msg", [
    ({"block_size": 1}, ValueError, "block_size"),
    ({"block_size": 2.0}, TypeError, "block_size"),
    ({"block_size": True}, TypeError, "block_size"),
    ({"q": torch.randn(1, 9, 2, 8)}, ValueError, "more positions"),
    ({"k": torch.randn(1, 5, 3, 8), "v": torch.randn(1, 5, 3, 8)}, ValueError, "multiple"),
    ({"v": torch.randn(1, 5, 2, 0)}, ValueError, "head dims"),
    ({"q": torch.randn(1, 5, 2)}, ValueError, "4-D"),
    ({"scale": "x"}, TypeError, "scale"),
    ({"return_lse": 1}, TypeError, "return_lse"),
    ({"q": torch.randn(1, 5, 2, 8).int()}, TypeError, "dtype"),
])
def test_bad_inputs_name_the_argument(kw, exc, msg):
    args = {"q": torch.randn(1, 5, 2, 8), "k": torch.randn(1, 5, 2, 8), "v": torch.randn(1, 5, 2, 8),
            "block_size": 4, **kw}
    with pytest.raises(exc, match=msg):
        fastattn.landmark_attention(**args)


def test_binding_rejects_bad_lengths_without_panic():
    from fastattn._native import lib

    q = torch.randn(1, 4, 1, 4)
    out, lse = torch.empty(1, 4, 1, 4), torch.empty(1, 4, 1)
    with pytest.raises(ValueError, match="buffer `q` has 15 elements"):
        lib.landmark_forward("float32", (1, 4, 4, 1, 1, 4, 4, 2), 1.0, 1, (q.data_ptr(), 15), (q.data_ptr(), 16),
                             (q.data_ptr(), 16), (out.data_ptr(), 16), (lse.data_ptr(), 4))
    with pytest.raises(ValueError, match="block_size"):
        lib.landmark_forward("float32", (1, 4, 4, 1, 1, 4, 4, 1), 1.0, 1, *[(q.data_ptr(), 16)] * 4,
                             (lse.data_ptr(), 4))


def test_forward_memory_stays_linear_in_t():
    """T = 16384 with one head: a [T, T] score matrix would be 1 GiB in float32; the fused
    forward must stay far below that (it holds a block's scores per row)."""
    code = textwrap.dedent("""
        import resource, torch, fastattn
        torch.set_num_threads(2)
        q, k, v = (torch.randn(1, 16384, 1, 8) for _ in range(3))
        fastattn.landmark_attention(q[:, :64], k[:, :64], v[:, :64], 64)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fastattn.landmark_attention(q, k, v, 64)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    grew_mib = float(res.stdout.strip().splitlines()[-1])
    assert grew_mib < 64, f"peak RSS grew by {grew_mib:.1f} MiB"
