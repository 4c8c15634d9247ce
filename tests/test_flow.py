"""Flow-Attention (docs/flow.md): outputs and gradients against a plain-PyTorch oracle
(``fastattn.reference.flow``), at every SIMD level; half
types; gradcheck; Flowformer module parity."""

import pytest
import torch

import fastattn
from fastattn.nn import FlowAttention, FlowAttentionCausal

from fastattn.reference import FlowAttention as RefFlowAttention
from fastattn.reference import FlowAttentionCausal as RefFlowAttentionCausal
from fastattn.reference import flow_attention as ref_flow


SHAPES = [  # (B, Tq, Tk, H, D, Dv)
    (1, 1, 1, 1, 4, 3),
    (2, 9, 9, 2, 8, 5),
    (1, 70, 70, 3, 16, 24),
    (1, 131, 131, 1, 7, 33),
    (2, 13, 29, 2, 8, 6),   # Tq != Tk (non-causal only)
    (1, 65, 3, 1, 4, 4),
]


def _inputs(shape, dtype, amp=2.0):
    b, n, m, h, d, dv = shape
    return (amp * torch.randn(b, n, h, d, dtype=dtype), amp * torch.randn(b, m, h, d, dtype=dtype),
            torch.randn(b, m, h, dv, dtype=dtype))


def _cases():
    for s in SHAPES:
        for causal in (False, True):
            if causal and s[1] != s[2]:
                continue
            yield pytest.param(s, causal, id=f"{'x'.join(map(str, s))}-{'causal' if causal else 'full'}")


@pytest.mark.parametrize("shape,causal", list(_cases()))
def test_float64_matches_reference_every_level(simd_level, shape, causal):
    q, k, v = (t.requires_grad_(True) for t in _inputs(shape, torch.float64))
    out = fastattn.flow_attention(q, k, v, causal=causal)
    want = ref_flow(q, k, v, causal=causal)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    wgrads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(grads, wgrads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_close_to_float64_every_level(simd_level, causal):
    # float32 is where the SIMD levels differ (the vector sigmoid and its gradient)
    shape = (1, 300, 300, 2, 32, 48)
    q, k, v = (t.requires_grad_(True) for t in _inputs(shape, torch.float32))
    out = fastattn.flow_attention(q, k, v, causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = ref_flow(q64, k64, v64, causal=causal)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    wgrads = torch.autograd.grad(want, (q64, k64, v64), g.double())
    for a, b in zip(grads, wgrads):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_types_accumulate_in_float32(dtype, causal):
    q, k, v = _inputs((1, 100, 100, 2, 16, 16), dtype)
    out = fastattn.flow_attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    want = ref_flow(q.double(), k.double(), v.double(), causal=causal)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    fastattn.flow_attention(q, k, v, causal=causal).sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = (t.requires_grad_(True) for t in _inputs((1, 6, 6 if causal else 5, 2, 3, 2), torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: fastattn.flow_attention(q, k, v, causal=causal), (q, k, v))


def test_clamp_region_gradients():
    # Large, positive-leaning q/k push the conserved source past 1 for some rows.
    q = (torch.randn(1, 40, 1, 4, dtype=torch.float64) * 4 + 3).requires_grad_(True)
    k = (torch.randn(1, 40, 1, 4, dtype=torch.float64) * 4 + 3).requires_grad_(True)
    v = torch.randn(1, 40, 1, 3, dtype=torch.float64).requires_grad_(True)
    for causal in (False, True):
        out = fastattn.flow_attention(q, k, v, causal=causal)
        want = ref_flow(q, k, v, causal=causal)
        torch.testing.assert_close(out, want)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_modules_load_flowformer_state_dict(causal):
    orig = (RefFlowAttentionCausal if causal else RefFlowAttention)(10, 16, 12, 4).double().eval()
    cls = FlowAttentionCausal if causal else FlowAttention
    ours = cls(10, 16, 12, 4).double().eval()
    ours.load_state_dict(orig.state_dict())
    assert set(ours.state_dict()) == {
        f"{p}_projection.{w}" for p in ("query", "key", "value", "out") for w in ("weight", "bias")
    }
    x = torch.rand(2, 23, 10, dtype=torch.float64)
    y = torch.rand(2, 23 if causal else 17, 10, dtype=torch.float64)
    torch.testing.assert_close(ours(x, y, y), orig(x, y, y))
    assert ours.dropout.p == 0.05 and ours.eps == 1e-6
