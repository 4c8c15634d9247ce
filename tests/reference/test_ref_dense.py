"""The dense reference against torch's SDPA and explicit scores."""

import pytest
import torch
import torch.nn.functional as F

from fastattn.reference import attention


def _sdpa_heads_last(q, k, v, mask=None, causal=False, scale=None):
    g = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("tq,tk,hq,hkv,d,dv", [(7, 7, 2, 2, 8, 8), (5, 13, 4, 2, 6, 3), (13, 5, 3, 1, 4, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(tq, tk, hq, hkv, d, dv, causal):
    q = torch.randn(2, tq, hq, d, dtype=torch.float64)
    k = torch.randn(2, tk, hkv, d, dtype=torch.float64)
    v = torch.randn(2, tk, hkv, dv, dtype=torch.float64)
    out, lse = attention(q, k, v, is_causal=causal, scale=0.4, return_lse=True)
    if not causal:
        want = _sdpa_heads_last(q, k, v, scale=0.4)
        rows = torch.ones(tq, dtype=torch.bool)
    elif tq == tk:
        want = _sdpa_heads_last(q, k, v, causal=True, scale=0.4)
        rows = torch.ones(tq, dtype=torch.bool)
    else:  # bottom-right alignment, built by hand
        mask = torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)
        rows = mask.any(-1)
        want = _sdpa_heads_last(q, k, v, mask=mask, scale=0.4).nan_to_num(0.0)
        want[:, ~rows] = 0.0
    torch.testing.assert_close(out, want)
    # lse from explicit scores
    g = hq // hkv
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(g, 2)) * 0.4
    if causal:
        s = s.masked_fill(~(torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).transpose(1, 2))
    assert torch.all(out[:, ~rows] == 0) and torch.all(lse[:, ~rows] == float("-inf"))


def test_fully_masked_rows_have_finite_zero_grads():
    q, k, v = (torch.randn(1, n, 2, 4, dtype=torch.float64, requires_grad=True) for n in (6, 3, 3))
    out = attention(q, k, v, is_causal=True)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[:, :3] == 0)
