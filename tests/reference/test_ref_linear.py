"""The linear-attention reference against fla's naive recurrence, per-sequence calls, state
resumption and the direct non-causal formula."""

import pytest
import torch
import torch.nn.functional as F

from fastattn.reference import linear_attention

D64 = dict(dtype=torch.float64)


def _qkv(b=2, t=11, h=3, k=5, v=4, positive=True):
    q, kk = torch.randn(b, t, h, k, **D64), torch.randn(b, t, h, k, **D64)
    if positive:  # normalising divides by q·Σk: keep it away from 0 as real feature maps do
        q, kk = q.sigmoid(), kk.sigmoid()
    return q, kk, torch.randn(b, t, h, v, **D64)


fla_naive = pytest.importorskip("fla.ops.linear_attn.naive")


@pytest.mark.peer
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_fla_naive(normalize, with_state):
    # fla's naive reference computes (and with normalize, only runs) in float32: feed it the
    # float32 inputs and compare with ours on the same values in float64.
    q, k, v = (x.float() for x in _qkv())
    init = None
    if with_state:
        kv0 = torch.randn(2, 3, 5, 4)
        init = (kv0, torch.rand(2, 1, 3, 5)) if normalize else kv0
    want, want_state = fla_naive.naive_recurrent_linear_attn(
        q, k, v, scale=0.7, initial_state=init, output_final_state=True, normalize=normalize
    )
    init64 = None if init is None else (tuple(x.double() for x in init) if normalize else init.double())
    got, state = linear_attention(
        q.double(), k.double(), v.double(), scale=0.7, initial_state=init64, output_final_state=True, normalize=normalize
    )
    want = want.double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if normalize:
        torch.testing.assert_close(state[0], want_state[0].double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[1], want_state[1].double(), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(state, want_state.double(), atol=1e-5, rtol=1e-5)


def test_state_forms_follow_fla():
    q, k, v = _qkv()
    o, (kv, z) = linear_attention(q, k, v, normalize=True)
    assert kv is None and z.shape == (2, 1, 3, 5)
    o, s = linear_attention(q, k, v, normalize=False)
    assert s is None
    o, s = linear_attention(q, k, v, normalize=False, output_final_state=True)
    assert s.shape == (2, 3, 5, 4)


@pytest.mark.parametrize("normalize", [False, True])
def test_cu_seqlens_equals_separate_calls(normalize):
    lens = [4, 1, 7, 0, 3]
    q, k, v = _qkv(b=1, t=sum(lens))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    kv0 = torch.randn(len(lens), 3, 5, 4, **D64)
    z0 = torch.rand(len(lens), 1, 3, 5, **D64)
    init = (kv0, z0) if normalize else kv0
    o, st = linear_attention(q, k, v, initial_state=init, output_final_state=True, normalize=normalize, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one_init = (kv0[n : n + 1], z0[n : n + 1]) if normalize else kv0[n : n + 1]
        o1, st1 = linear_attention(
            q[:, s:e], k[:, s:e], v[:, s:e], initial_state=one_init, output_final_state=True, normalize=normalize
        )
        torch.testing.assert_close(o[:, s:e], o1)
        if normalize:
            torch.testing.assert_close(st[0][n], st1[0][0])
            torch.testing.assert_close(st[1][n], st1[1][0])
        else:
            torch.testing.assert_close(st[n], st1[0])


@pytest.mark.parametrize("normalize", [False, True])
def test_split_and_resume_equals_one_call(normalize):
    q, k, v = _qkv(t=13)
    whole, s_whole = linear_attention(q, k, v, normalize=normalize, output_final_state=True)
    a, s_a = linear_attention(q[:, :6], k[:, :6], v[:, :6], normalize=normalize, output_final_state=True)
    b, s_b = linear_attention(q[:, 6:], k[:, 6:], v[:, 6:], normalize=normalize, initial_state=s_a, output_final_state=True)
    torch.testing.assert_close(torch.cat([a, b], 1), whole)
    for x, y in zip(s_b if normalize else [s_b], s_whole if normalize else [s_whole]):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("normalize", [False, True])
def test_non_causal_matches_direct_formula(normalize):
    q, k, v = _qkv()
    got, state = linear_attention(q, k, v, scale=0.3, normalize=normalize, causal=False)
    s = torch.einsum("bthk,bjhk->bhtj", q, k) * 0.3
    want = torch.einsum("bhtj,bjhv->bthv", s, v)
    if normalize:
        want = want / (s.sum(-1).transpose(1, 2)[..., None] + 1e-10)
    torch.testing.assert_close(got, want)
    assert state is None


@pytest.mark.parametrize("name,fn", [("elu1", lambda x: F.elu(x) + 1), ("relu", F.relu), ("identity", lambda x: x)])
def test_feature_maps_apply_to_q_and_k(name, fn):
    q, k, v = _qkv(positive=False)
    got, _ = linear_attention(q, k, v, normalize=False, feature_map=name)
    want, _ = linear_attention(fn(q), fn(k), v, normalize=False)
    torch.testing.assert_close(got, want)


def test_causal_output_is_explicit_masked_sum():
    q, k, v = _qkv(t=9)
    got, _ = linear_attention(q, k, v, normalize=False)
    s = torch.einsum("bthk,bjhk->bhtj", q, k) * 5**-0.5
    s = s * torch.tril(torch.ones(9, 9, **D64))
    torch.testing.assert_close(got, torch.einsum("bhtj,bjhv->bthv", s, v))


def test_half_inputs_accumulate_in_float32():
    q, k, v = (x.to(torch.bfloat16) for x in _qkv())
    o, (kv, z) = linear_attention(q, k, v, output_final_state=True)
    assert o.dtype == torch.bfloat16 and kv.dtype == torch.float32 and z.dtype == torch.float32
