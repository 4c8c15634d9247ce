"""Linear attention (docs/linear.md): outputs, final states and gradients against a plain-PyTorch
oracle (``fastattn.reference.linear``) at every SIMD level, fla's naive
reference, split-and-resume, half types and gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.reference import linear_attention as ref_linear


def _inputs(b, t, h, kd, vd, dtype, positive):
    q, k = torch.randn(b, t, h, kd, dtype=dtype), torch.randn(b, t, h, kd, dtype=dtype)
    if positive:  # keep the normaliser away from zero for the identity map
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return q, k, torch.randn(b, t, h, vd, dtype=dtype)


SHAPES = [(1, 1, 1, 4, 3), (2, 7, 2, 8, 5), (1, 64, 2, 16, 16), (2, 131, 3, 9, 33), (1, 200, 1, 33, 7)]


def _flatten(o, st):
    out = [o]
    if isinstance(st, tuple):
        out += [s for s in st if s is not None]
    elif st is not None:
        out.append(st)
    return out


def _compare(ours, want, inputs, rtol=1e-9, atol=1e-11):
    assert len(ours) == len(want)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol)
    gs = [torch.randn_like(x) for x in ours]
    ga = torch.autograd.grad(ours, inputs, gs, allow_unused=True)
    gb = torch.autograd.grad(want, inputs, gs, allow_unused=True)
    for a, b in zip(ga, gb):
        if b is None:
            assert a is None or not a.abs().any()
            continue
        torch.testing.assert_close(a, b, rtol=rtol * 100, atol=atol * 100)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_float64_matches_reference_every_level(simd_level, shape, normalize, causal):
    b, t, h, kd, vd = shape
    for fm in (None, "elu1", "relu"):
        q, k, v = (x.requires_grad_(True) for x in _inputs(b, t, h, kd, vd, torch.float64, normalize))
        inputs = [q, k, v]
        state = None
        if causal:
            kv0 = torch.randn(b, h, kd, vd, dtype=torch.float64, requires_grad=True)
            z0 = (torch.rand(b, 1, h, kd, dtype=torch.float64) + 0.1).requires_grad_(True)
            state = (kv0, z0) if normalize else kv0
            inputs += [kv0, z0] if normalize else [kv0]
        kw = dict(scale=0.3, initial_state=state, output_final_state=causal, normalize=normalize, causal=causal,
                  feature_map=fm)
        o, st = fastattn.linear_attention(q, k, v, **kw)
        wo, wst = ref_linear(q, k, v, **kw)
        _compare(_flatten(o, st), _flatten(wo, wst), inputs)


@pytest.mark.parametrize("normalize", [True, False])
def test_packed_cu_seqlens_with_states(simd_level, normalize):
    lens = [5, 0, 70, 1, 33]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int64)
    t, h, kd, vd, n = int(cu[-1]), 2, 6, 9, len(lens)
    q, k, v = (x.requires_grad_(True) for x in _inputs(1, t, h, kd, vd, torch.float64, True))
    kv0 = torch.randn(n, h, kd, vd, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(n, 1, h, kd, dtype=torch.float64) + 0.1).requires_grad_(True)
    state = (kv0, z0) if normalize else kv0
    inputs = [q, k, v, kv0] + ([z0] if normalize else [])
    kw = dict(initial_state=state, output_final_state=True, normalize=normalize, cu_seqlens=cu, feature_map="elu1")
    o, st = fastattn.linear_attention(q, k, v, **kw)
    wo, wst = ref_linear(q, k, v, **kw)
    _compare(_flatten(o, st), _flatten(wo, wst), inputs)
    # int32 offsets work too and each segment equals its own call
    o32, _ = fastattn.linear_attention(q, k, v, **{**kw, "cu_seqlens": cu.to(torch.int32)})
    torch.testing.assert_close(o32, o)
    s, e = int(cu[2]), int(cu[3])
    st2 = (kv0[2:3], z0[2:3]) if normalize else kv0[2:3]
    o_seg, _ = fastattn.linear_attention(q[:, s:e], k[:, s:e], v[:, s:e], initial_state=st2, normalize=normalize,
                                         feature_map="elu1")
    torch.testing.assert_close(o_seg, o[:, s:e])


@pytest.mark.parametrize("normalize", [True, False])
def test_float32_close_to_float64(normalize):
    q, k, v = _inputs(1, 1000, 2, 64, 48, torch.float32, normalize)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    o, _ = fastattn.linear_attention(q, k, v, normalize=normalize)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    wo, _ = ref_linear(q64, k64, v64, normalize=normalize)
    scale = wo.abs().max().item()
    torch.testing.assert_close(o.double(), wo, rtol=1e-4, atol=1e-5 * scale)
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(wo, (q64, k64, v64), g.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_fla_naive(normalize):
    naive = pytest.importorskip("fla.ops.linear_attn.naive").naive_recurrent_linear_attn
    q, k, v = _inputs(2, 77, 3, 16, 24, torch.float32, True)
    kv0 = torch.randn(2, 3, 16, 24)
    z0 = torch.rand(2, 1, 3, 16)
    state = (kv0, z0) if normalize else kv0
    o, st = fastattn.linear_attention(q, k, v, initial_state=state, output_final_state=True, normalize=normalize)
    wo, wst = naive(q, k, v, initial_state=state, output_final_state=True, normalize=normalize)
    torch.testing.assert_close(o, wo, rtol=1e-4, atol=1e-4)
    for a, b in zip(_flatten(o, st)[1:], _flatten(wo, wst)[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fla_state_conventions():
    q, k, v = _inputs(1, 10, 2, 4, 3, torch.float32, True)
    o, st = fastattn.linear_attention(q, k, v)  # fla: (None, z) even without output_final_state
    assert isinstance(st, tuple) and st[0] is None and st[1].shape == (1, 1, 2, 4)
    o, st = fastattn.linear_attention(q, k, v, normalize=False)
    assert st is None
    kv0 = torch.randn(1, 2, 4, 3)
    # A bare tensor with normalize=True is the kv state; z starts at 0.
    o1, _ = fastattn.linear_attention(q, k, v, initial_state=kv0)
    o2, _ = fastattn.linear_attention(q, k, v, initial_state=(kv0, None))
    torch.testing.assert_close(o1, o2)
    o, st = fastattn.linear_attention(q, k, v, causal=False)
    assert st is None


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_and_resume_equals_one_call(normalize, dtype):
    q, k, v = _inputs(2, 150, 2, 8, 8, dtype, True)
    o, st = fastattn.linear_attention(q, k, v, output_final_state=True, normalize=normalize, feature_map="elu1")
    state, parts = None, []
    for s, e in [(0, 1), (1, 70), (70, 71), (71, 150)]:
        oi, state = fastattn.linear_attention(q[:, s:e], k[:, s:e], v[:, s:e], initial_state=state,
                                              output_final_state=True, normalize=normalize, feature_map="elu1")
        parts.append(oi)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(torch.cat(parts, 1), o, **tol)
    for a, b in zip(_flatten(o, st)[1:], _flatten(o, state)[1:]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_half_types_accumulate_in_float32(dtype, causal):
    q, k, v = _inputs(1, 300, 2, 32, 32, dtype, False)
    o, st = fastattn.linear_attention(q, k, v, causal=causal, feature_map="elu1")
    assert o.dtype == dtype
    if causal:
        assert st[1].dtype == torch.float32
    wo, _ = ref_linear(q.double(), k.double(), v.double(), causal=causal, feature_map="elu1")
    torch.testing.assert_close(o.double(), wo, rtol=2e-2, atol=2e-2 * wo.abs().max().item())
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    fastattn.linear_attention(q, k, v, causal=causal, feature_map="elu1")[0].float().sum().backward()
    assert all(x.grad.dtype == dtype and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_elu1_and_epsilon_survive_half_inputs():
    # elu(x)+1 at -8 is 3.4e-4: computed in bf16 it rounds to 0 (0/eps outputs); in the kernel
    # it is computed in float32, so the normalised output is the exact 1.
    assert (F.elu(torch.tensor(-8.0, dtype=torch.bfloat16)) + 1).item() == 0.0
    q = torch.full((1, 4, 1, 4), -8.0, dtype=torch.bfloat16)
    k = torch.full((1, 4, 1, 4), -8.0, dtype=torch.bfloat16)
    v = torch.ones(1, 4, 1, 2, dtype=torch.bfloat16)
    o, _ = fastattn.linear_attention(q, k, v, feature_map="elu1")
    assert torch.isfinite(o.float()).all()
    torch.testing.assert_close(o.float(), torch.ones(1, 4, 1, 2), rtol=1e-2, atol=1e-2)


def test_decode_steps_equal_full_call():
    q, k, v = _inputs(1, 20, 4, 16, 16, torch.float32, False)
    o, _ = fastattn.linear_attention(q, k, v, feature_map="elu1")
    state, outs = None, []
    for t in range(20):
        ot, state = fastattn.linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], initial_state=state,
                                              output_final_state=True, feature_map="elu1")
        outs.append(ot)
    torch.testing.assert_close(torch.cat(outs, 1), o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_including_states(normalize, causal):
    q, k, v = (x.requires_grad_(True) for x in _inputs(1, 9, 2, 3, 2, torch.float64, True))
    args = [q, k, v]
    if causal:
        kv0 = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
        z0 = (torch.rand(1, 1, 2, 3, dtype=torch.float64) + 0.5).requires_grad_(True)
        args += [kv0, z0] if normalize else [kv0]

    def f(q, k, v, *st):
        state = None if not st else (tuple(st) if normalize else st[0])
        o, fs = fastattn.linear_attention(q, k, v, initial_state=state, output_final_state=causal,
                                          normalize=normalize, causal=causal, feature_map="elu1")
        return tuple(_flatten(o, fs))

    assert torch.autograd.gradcheck(f, tuple(args))


def test_gradcheck_packed():
    cu = torch.tensor([0, 4, 4, 9])
    q, k, v = (x.requires_grad_(True) for x in _inputs(1, 9, 1, 3, 2, torch.float64, True))
    kv0 = torch.randn(3, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(3, 1, 1, 3, dtype=torch.float64) + 0.5).requires_grad_(True)

    def f(q, k, v, kv0, z0):
        o, (kv, z) = fastattn.linear_attention(q, k, v, initial_state=(kv0, z0), output_final_state=True,
                                               cu_seqlens=cu)
        return o, kv, z

    assert torch.autograd.gradcheck(f, (q, k, v, kv0, z0))
