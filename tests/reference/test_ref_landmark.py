"""The landmark-attention reference against an explicit per-query loop from docs/landmark.md, its
structural properties, and retrieval vs the training form."""

import pytest
import torch

from fastattn.reference import attention, landmark_attention, landmark_retrieval_attention


def _loop_landmark(q, k, v, bs, scale):
    b, t, h, _ = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            def e(i, j):
                return torch.exp(scale * q[bi, i, hi] @ k[bi, j, hi])

            for i in range(t):
                blk = i // bs
                local = [j for j in range(blk * bs, i + 1) if j % bs != bs - 1]
                gates = {g: e(i, g * bs + bs - 1) for g in range(blk)}
                z = sum(e(i, j) for j in local) + sum(gates.values())
                acc = sum(e(i, j) / z * v[bi, j, hi] for j in local)
                for g, gate in gates.items():
                    regular = range(g * bs, g * bs + bs - 1)
                    den = sum(e(i, j) for j in regular)
                    acc = acc + sum(gate / z * e(i, j) / den * v[bi, j, hi] for j in regular)
                out[bi, i, hi] = acc
    return out


@pytest.mark.parametrize("t,bs", [(23, 5), (20, 4), (7, 2), (3, 8)])
def test_matches_explicit_loop(t, bs):
    q, k, v = (torch.randn(2, t, 2, 3, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(landmark_attention(q, k, v, bs, scale=0.6), _loop_landmark(q, k, v, bs, 0.6))


def test_weights_sum_to_one_and_landmarks_get_none():
    q, k = torch.randn(1, 19, 2, 4, dtype=torch.float64), torch.randn(1, 19, 2, 4, dtype=torch.float64)
    ones = torch.ones(1, 19, 2, 1, dtype=torch.float64)
    torch.testing.assert_close(landmark_attention(q, k, ones, 4), ones)
    v = torch.randn(1, 19, 2, 3, dtype=torch.float64)
    v2 = v.clone()
    v2[:, 3::4] += 100.0  # landmark positions
    torch.testing.assert_close(landmark_attention(q, k, v2, 4), landmark_attention(q, k, v, 4))


def test_single_block_is_causal_softmax():
    q, k, v = (torch.randn(1, 6, 2, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(landmark_attention(q, k, v, 7), attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("tq", [1, 5, 23])
def test_retrieval_with_every_block_equals_training_form(tq):
    q, k, v = (torch.randn(2, 23, 2, 3, dtype=torch.float64) for _ in range(3))
    full = landmark_attention(q, k, v, 5)
    got = landmark_retrieval_attention(q[:, -tq:], k, v, 5, top_k=10)
    torch.testing.assert_close(got, full[:, -tq:])


def test_retrieval_keeps_only_the_best_blocks():
    q, k, v = (torch.randn(1, 16, 1, 3, dtype=torch.float64) for _ in range(3))
    got = landmark_retrieval_attention(q[:, -1:], k, v, 4, top_k=1)
    # Query 15 sits in block 3; find its best earlier landmark, then mask the others.
    scores = [float(q[0, 15, 0] @ k[0, g * 4 + 3, 0]) for g in range(3)]
    best = max(range(3), key=lambda g: scores[g])
    keep = [best * 4 + j for j in range(4)] + [12, 13, 14, 15]
    want = landmark_attention(q[:, keep], k[:, keep], v[:, keep], 4, scale=3**-0.5)[:, -1:]
    torch.testing.assert_close(got, want)
