"""The flow-attention reference against an explicit per-position loop written from docs/flow.md,
its causality, and the Flowformer-shaped modules."""

import math

import pytest
import torch

from fastattn.reference import FlowAttention, FlowAttentionCausal, flow_attention

EPS = 1e-6


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _loop_flow(q, k, v, causal):
    """docs/flow.md with python loops over positions, one (batch, head) at a time."""
    b, n, h, d = q.shape
    m = k.shape[1]
    out = torch.zeros(b, n, h, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            fq = torch.sigmoid(q[bi, :, hi])  # [n, d]
            fk = torch.sigmoid(k[bi, :, hi])
            vv = v[bi, :, hi]
            if not causal:
                inc = [1 / float((fq[i] + EPS) @ (fk.sum(0) + EPS)) for i in range(n)]
                outg = [1 / float((fk[j] + EPS) @ (fq.sum(0) + EPS)) for j in range(m)]
                sink_sum = sum(outg[j] * fk[j] for j in range(m))
                src_sum = sum(inc[i] * fq[i] for i in range(n))
                sink = [float((fq[i] + EPS) @ (sink_sum + EPS)) for i in range(n)]
                src = [min(1.0, max(-1.0, float((fk[j] + EPS) @ (src_sum + EPS)))) for j in range(m)]
                den = sum(math.exp(x) for x in src)
                comp = [m * math.exp(src[j]) / den for j in range(m)]
                for i in range(n):
                    acc = sum(float(fq[i] @ fk[j]) * comp[j] * vv[j] for j in range(m))
                    out[bi, i, hi] = _sig(sink[i] * n / m) * inc[i] * acc
            else:
                inc = [1 / float((fq[t] + EPS) @ (fk[: t + 1].sum(0) + EPS)) for t in range(n)]
                outg = [1 / float((fk[t] + EPS) @ (fq[: t + 1].sum(0) + EPS)) for t in range(n)]
                sink, src = [], []
                for t in range(n):
                    ss = sum((j + 1) * outg[j] * fk[j] for j in range(t + 1))
                    sink.append(float((fq[t] + EPS) @ (ss + EPS)) / (t + 1))
                    qs = sum((i + 1) * inc[i] * fq[i] for i in range(t + 1))
                    src.append(min(1.0, max(-1.0, float((fk[t] + EPS) @ (qs + EPS)) / (t + 1))))
                # competition of position j uses the prefix up to j itself
                comp = [(j + 1) * math.exp(src[j]) / sum(math.exp(src[i]) for i in range(j + 1)) for j in range(n)]
                for t in range(n):
                    acc = sum(float(fq[t] @ fk[j]) * comp[j] * vv[j] for j in range(t + 1))
                    out[bi, t, hi] = _sig(sink[t]) * inc[t] * acc
    return out


@pytest.mark.parametrize("n,m,causal", [(5, 5, False), (4, 7, False), (6, 6, True), (1, 1, True)])
def test_matches_explicit_loops(n, m, causal):
    q = torch.randn(2, n, 2, 3, dtype=torch.float64)
    k = torch.randn(2, m, 2, 3, dtype=torch.float64) * 2
    v = torch.randn(2, m, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(flow_attention(q, k, v, causal=causal), _loop_flow(q, k, v, causal))


def test_causal_output_depends_only_on_the_past():
    q, k, v = (torch.randn(1, 10, 2, 4, dtype=torch.float64) for _ in range(3))
    base = flow_attention(q, k, v, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, 6:] += torch.randn_like(x[:, 6:])
    moved = flow_attention(q2, k2, v2, causal=True)
    torch.testing.assert_close(moved[:, :6], base[:, :6])
    assert not torch.allclose(moved[:, 6:], base[:, 6:])
    # and it equals the causal form run on the prefix alone
    torch.testing.assert_close(flow_attention(q[:, :6], k[:, :6], v[:, :6], causal=True), base[:, :6])


@pytest.mark.parametrize("cls", [FlowAttention, FlowAttentionCausal])
def test_modules_follow_flowformer(cls):
    m = cls(d_input=12, d_model=16, d_output=10, n_heads=4, drop_out=0.0)
    assert set(m.state_dict()) == {
        f"{n}.{p}" for n in ("query_projection", "key_projection", "value_projection", "out_projection") for p in ("weight", "bias")
    }
    x = torch.randn(2, 7, 12)
    out = m(x, x, x)
    assert out.shape == (2, 7, 10)
    q = m.query_projection(x).view(2, 7, 4, 4)
    k = m.key_projection(x).view(2, 7, 4, 4)
    v = m.value_projection(x).view(2, 7, 4, 4)
    want = m.out_projection(flow_attention(q, k, v, causal=cls is FlowAttentionCausal).reshape(2, 7, 16))
    torch.testing.assert_close(out, want)
    # dropout comes after the output projection: p=1 zeroes the output itself
    m.dropout.p = 1.0
    m.train()
    assert torch.all(m(x, x, x) == 0)


def test_causal_equals_non_causal_where_the_prefix_is_the_whole_sequence():
    # With one token every prefix sum is the full sum, t = n = m = 1, the causal allocation's
    # missing n/m factor is 1 and both competitions are 1: the two forms must agree.
    q, k, v = (torch.randn(3, 1, 2, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(flow_attention(q, k, v, causal=True), flow_attention(q, k, v, causal=False))
    # With more tokens they differ (position weights t and the prefix softmax), so the
    # causal form is not the non-causal one in disguise.
    q, k, v = (torch.randn(1, 5, 2, 4, dtype=torch.float64) for _ in range(3))
    assert not torch.allclose(flow_attention(q, k, v, causal=True), flow_attention(q, k, v, causal=False))
