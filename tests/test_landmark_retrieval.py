"""Landmark retrieval (docs/landmark.md, Retrieval) against a brute-force float64 transcription,
written query by query with explicit candidate lists, for every selection mode; top_k from 0
to past the number of blocks (where it is the training form); ties; indices; bad input."""

import math

import pytest
import torch

import fastattn

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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Tq{}-Tk{}-H{}-{}-D{}-{}-bs{}".format(*s))
@pytest.mark.parametrize("top_k", [0, 1, 2, 5, 100])
def test_matches_brute_force(mode, shape, top_k):
    b, tq, tk, h, hkv, d, dv, bs = shape
    q, k, v = torch.randn(b, tq, h, d, dtype=D64), torch.randn(b, tk, hkv, d, dtype=D64), torch.randn(b, tk, hkv, dv, dtype=D64)
    out, idx = fastattn.landmark_retrieval_attention(q, k, v, bs, top_k, 0.6, mode, return_indices=True)
    want, kept = _brute(q, k, v, bs, top_k, 0.6, mode)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    assert idx.shape == (b, h, tq, top_k) and idx.dtype == torch.int64
    for bb in range(b):
        for hh in range(h):
            for i in range(tq):
                got = [g for g in idx[bb, hh, i].tolist() if g >= 0]
                assert got == kept[bb][hh][i], (bb, hh, i)
                assert all(g == -1 for g in idx[bb, hh, i, len(got):].tolist())


@pytest.mark.parametrize("mode", MODES)
def test_keeping_every_block_is_the_training_form(mode):
    q, k, v = torch.randn(2, 7, 4, 8, dtype=D64), torch.randn(2, 45, 2, 8, dtype=D64), torch.randn(2, 45, 2, 8, dtype=D64)
    got = fastattn.landmark_retrieval_attention(q, k, v, 5, 9, selection=mode)
    torch.testing.assert_close(got, fastattn.landmark_attention(q, k, v, 5), rtol=1e-10, atol=1e-12)


def test_ties_go_to_the_earlier_block():
    q = torch.randn(1, 1, 1, 4, dtype=D64)
    k, v = torch.randn(1, 17, 1, 4, dtype=D64), torch.randn(1, 17, 1, 4, dtype=D64)
    k[0, 3] = k[0, 11]  # blocks 0 and 2 have the same landmark key (block size 4)
    k[0, 7] = k[0, 11] - 5 * q[0, 0, 0] / q[0, 0, 0].norm()  # block 1 ranks below them
    for mode in MODES:
        _, idx = fastattn.landmark_retrieval_attention(q, k, v, 4, 1, selection=mode, return_indices=True)
        assert idx.flatten().tolist() == [0], mode
        _, idx = fastattn.landmark_retrieval_attention(q, k, v, 4, 2, selection=mode, return_indices=True)
        assert idx.flatten().tolist() == [0, 2], mode


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_lower_precision(dtype, tol):
    q, k, v = torch.randn(1, 3, 4, 16, dtype=dtype), torch.randn(1, 70, 4, 16, dtype=dtype), torch.randn(1, 70, 4, 16, dtype=dtype)
    got = fastattn.landmark_retrieval_attention(q, k, v, 8, 3)
    want = fastattn.landmark_retrieval_attention(q.double(), k.double(), v.double(), 8, 3)
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
