"""Landmark retrieval (docs/landmark.md, Retrieval) against a brute-force float64 transcription,
written query by query with explicit candidate lists, for every selection mode; top_k from 0
to past the number of blocks (where it is the training form); ties; indices; bad input. Both
implementations: the Rust kernel (CPU tensors, every SIMD level, and the numpy twin) and the
PyTorch one that serves other devices."""

import math

import numpy as np
import pytest
import torch

import fastattn
import fastattn.numpy as fnp
from fastattn.landmark import _retrieval_torch, retrieval_dims


def _torch_impl(q, k, v, bs, top_k, scale=None, selection="per_token_and_head", return_indices=False):
    """The PyTorch implementation called directly (on CPU tensors it is otherwise unused)."""
    dims = retrieval_dims(q.shape, k.shape, v.shape, bs, top_k, selection, return_indices)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _retrieval_torch(q, k, v, bs, top_k, scale, selection, return_indices, dims)


def _numpy_impl(q, k, v, bs, top_k, scale=None, selection="per_token_and_head", return_indices=False):
    got = fnp.landmark_retrieval_attention(q.numpy(), k.numpy(), v.numpy(), bs, top_k, scale, selection,
                                           return_indices)
    return (torch.from_numpy(got[0]), torch.from_numpy(got[1])) if return_indices else torch.from_numpy(got)


IMPLS = {"rust": fastattn.landmark_retrieval_attention, "torch": _torch_impl, "numpy": _numpy_impl}

D64 = torch.float64
MODES = ("per_token_and_head", "max_over_heads", "max_over_tokens")


def _brute(q, k, v, bs, top_k, scale, mode):
    """(out [B, Tq, H, Dv], kept [B][H][Tq] lists of blocks, best first)."""
    b, tq, h, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    group, nb = h // hkv, tk // bs
    pos = [tk - tq + i for i in range(tq)]
    cands = [[g for g in range(nb) if g < p // bs] for p in pos]
    score = lambda bb, hh, i, j: scale * float(q[bb, i, hh] @ k[bb, j, hh // group])  # noqa: E731
    prob = {}
    for bb in range(b):
        for hh in range(h):
            for i in range(tq):
                ls = [score(bb, hh, i, g * bs + bs - 1) for g in cands[i]]
                m = max(ls, default=0.0)
                z = sum(math.exp(x - m) for x in ls)
                for g, x in zip(cands[i], ls):
                    prob[bb, hh, i, g] = math.exp(x - m) / z
    out = torch.zeros(b, tq, h, dv, dtype=D64)
    kept = [[[None] * tq for _ in range(h)] for _ in range(b)]
    for bb in range(b):
        for hh in range(h):
            for i in range(tq):
                def rank(g):
                    if mode == "per_token_and_head":
                        return prob[bb, hh, i, g]
                    if mode == "max_over_heads":
                        return max(prob[bb, x, i, g] for x in range(h))
                    return max(prob[bb, hh, j, g] for j in range(tq) if g in cands[j])
                chosen = sorted(cands[i], key=lambda g: (-rank(g), g))[:top_k]
                kept[bb][hh][i] = chosen
                p = pos[i]
                items = []  # (logit, value)
                for j in range(p // bs * bs, p + 1):
                    if j % bs != bs - 1:
                        items.append((score(bb, hh, i, j), v[bb, j, hh // group]))
                for g in chosen:
                    regs = range(g * bs, g * bs + bs - 1)
                    s = [score(bb, hh, i, j) for j in regs]
                    m = max(s)
                    w = [math.exp(x - m) for x in s]
                    avg = sum(wj * v[bb, j, hh // group] for wj, j in zip(w, regs)) / sum(w)
                    items.append((score(bb, hh, i, g * bs + bs - 1), avg))
                m = max(x for x, _ in items)
                z = sum(math.exp(x - m) for x, _ in items)
                out[bb, i, hh] = sum(math.exp(x - m) / z * val for x, val in items)
    return out, kept


# (B, Tq, Tk, H, H_kv, D, Dv, block)
SHAPES = [
    (1, 1, 41, 4, 2, 8, 6, 4),    # decode, GQA, a tail of 1
    (2, 6, 50, 3, 1, 8, 8, 6),    # a chunk of queries crossing a block boundary, MQA
    (1, 9, 27, 2, 2, 4, 5, 3),    # many small blocks, tail 0
    (1, 2, 5, 2, 1, 4, 4, 8),     # no complete block yet
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Tq{}-Tk{}-H{}-{}-D{}-{}-bs{}".format(*s))
@pytest.mark.parametrize("top_k", [0, 1, 2, 5, 100])
def test_matches_brute_force(impl, mode, shape, top_k):
    b, tq, tk, h, hkv, d, dv, bs = shape
    q, k, v = torch.randn(b, tq, h, d, dtype=D64), torch.randn(b, tk, hkv, d, dtype=D64), torch.randn(b, tk, hkv, dv, dtype=D64)
    out, idx = IMPLS[impl](q, k, v, bs, top_k, 0.6, mode, return_indices=True)
    want, kept = _brute(q, k, v, bs, top_k, 0.6, mode)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    assert idx.shape == (b, h, tq, top_k) and idx.dtype == torch.int64
    for bb in range(b):
        for hh in range(h):
            for i in range(tq):
                got = [g for g in idx[bb, hh, i].tolist() if g >= 0]
                assert got == kept[bb][hh][i], (bb, hh, i)
                assert all(g == -1 for g in idx[bb, hh, i, len(got):].tolist())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_keeping_every_block_is_the_training_form(impl, mode):
    q, k, v = torch.randn(2, 7, 4, 8, dtype=D64), torch.randn(2, 45, 2, 8, dtype=D64), torch.randn(2, 45, 2, 8, dtype=D64)
    got = IMPLS[impl](q, k, v, 5, 9, selection=mode)
    torch.testing.assert_close(got, fastattn.landmark_attention(q, k, v, 5), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_the_earlier_block(impl):
    q = torch.randn(1, 1, 1, 4, dtype=D64)
    k, v = torch.randn(1, 17, 1, 4, dtype=D64), torch.randn(1, 17, 1, 4, dtype=D64)
    k[0, 3] = k[0, 11]  # blocks 0 and 2 have the same landmark key (block size 4)
    k[0, 7] = k[0, 11] - 5 * q[0, 0, 0] / q[0, 0, 0].norm()  # block 1 ranks below them
    for mode in MODES:
        _, idx = IMPLS[impl](q, k, v, 4, 1, selection=mode, return_indices=True)
        assert idx.flatten().tolist() == [0], mode
        _, idx = IMPLS[impl](q, k, v, 4, 2, selection=mode, return_indices=True)
        assert idx.flatten().tolist() == [0, 2], mode


@pytest.mark.parametrize("mode", MODES)
def test_kernel_matches_brute_force_every_level(simd_level, mode):
    # a decode-like shape with head dims past one vector, and a chunk of float32 queries
    q, k, v = torch.randn(1, 3, 4, 40, dtype=D64), torch.randn(1, 150, 2, 40, dtype=D64), torch.randn(1, 150, 2, 24, dtype=D64)
    out, idx = fastattn.landmark_retrieval_attention(q, k, v, 16, 3, 0.2, mode, return_indices=True)
    want, kept = _brute(q, k, v, 16, 3, 0.2, mode)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    assert [[[g for g in row if g >= 0] for row in hh] for hh in idx[0].tolist()] == kept[0]
    got = fastattn.landmark_retrieval_attention(q.float(), k.float(), v.float(), 16, 3, 0.2, mode)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_numpy_float16_and_bad_input():
    q, k, v = (np.random.default_rng(0).standard_normal(s).astype(np.float16) for s in ((1, 2, 2, 8), (1, 40, 2, 8), (1, 40, 2, 8)))
    got = fnp.landmark_retrieval_attention(q, k, v, 8, 2)
    want = fnp.landmark_retrieval_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), 8, 2)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=5e-3, atol=5e-3)
    with pytest.raises(ValueError, match="selection"):
        fnp.landmark_retrieval_attention(q, k, v, 8, 2, selection="max")
    with pytest.raises(TypeError, match="k_cache"):
        fnp.landmark_retrieval_attention(q, k.tolist(), v, 8, 2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("impl", ["rust", "torch"])
def test_lower_precision(impl, dtype, tol):
    q, k, v = torch.randn(1, 3, 4, 16, dtype=dtype), torch.randn(1, 70, 4, 16, dtype=dtype), torch.randn(1, 70, 4, 16, dtype=dtype)
    got = IMPLS[impl](q, k, v, 8, 3)
    want = IMPLS[impl](q.double(), k.double(), v.double(), 8, 3)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_a_gradient_is_refused_clearly():
    q = torch.randn(1, 1, 2, 4, requires_grad=True)
    k, v = torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2, 4)
    with pytest.raises(RuntimeError, match="inference only"):
        fastattn.landmark_retrieval_attention(q, k, v, 4, 1)
    with torch.no_grad():
        assert fastattn.landmark_retrieval_attention(q, k, v, 4, 1).shape == (1, 1, 2, 4)


@pytest.mark.parametrize("kw,exc,msg", [
    ({"selection": "max"}, ValueError, "selection"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"top_k": 1.5}, TypeError, "top_k"),
    ({"block_size": 1}, ValueError, "block_size"),
    ({"q": torch.randn(1, 10, 2, 4)}, ValueError, "more positions"),
    ({"k_cache": torch.randn(1, 9, 3, 4), "v_cache": torch.randn(1, 9, 3, 4)}, ValueError, "multiple"),
    ({"v_cache": torch.randn(1, 8, 2, 4)}, ValueError, "v_cache"),
    ({"return_indices": "yes"}, TypeError, "return_indices"),
    ({"k_cache": torch.randn(1, 9, 2, 4).int()}, TypeError, "k_cache"),
])
def test_bad_inputs_name_the_argument(kw, exc, msg):
    args = {"q": torch.randn(1, 1, 2, 4), "k_cache": torch.randn(1, 9, 2, 4), "v_cache": torch.randn(1, 9, 2, 4),
            "block_size": 4, "top_k": 1, **kw}
    with pytest.raises(exc, match=msg):
        fastattn.landmark_retrieval_attention(**args)
