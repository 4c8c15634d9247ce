"""Flow-Attention (SPEC §4): outputs and gradients against a plain-PyTorch transcription of
Flowformer's modules (``fastattn.reference.flow`` when present), at every SIMD level; half
types; gradcheck; Flowformer module parity."""

import pytest
import torch

import fastattn
from fastattn.nn import FlowAttention, FlowAttentionCausal

try:  # the shared oracle, once it lands
    from fastattn.reference.flow import flow_attention as _shared_ref_flow
except ImportError:  # pragma: no cover
    _shared_ref_flow = None


def local_ref_flow(q, k, v, causal=False, eps=1e-6):
    """Flowformer's math, heads-last, written from SPEC §4 (causal via explicit cumsums)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    n, m = q.shape[2], k.shape[2]
    if not causal:
        inc = 1.0 / torch.einsum("bhld,bhd->bhl", q + eps, k.sum(2) + eps)
        out_ = 1.0 / torch.einsum("bhld,bhd->bhl", k + eps, q.sum(2) + eps)
        sink = torch.einsum("bhld,bhd->bhl", q + eps, (k * out_[..., None]).sum(2) + eps)
        src = torch.einsum("bhld,bhd->bhl", k + eps, (q * inc[..., None]).sum(2) + eps).clamp(-1, 1)
        alloc = torch.sigmoid(sink * (n / m))
        comp = torch.softmax(src, dim=-1) * m
        kv = torch.einsum("bhld,bhlm->bhdm", k, v * comp[..., None])
        x = torch.einsum("bhld,bhdm->bhlm", q * inc[..., None], kv) * alloc[..., None]
    else:
        t = torch.arange(1, n + 1, dtype=q.dtype)[None, None, :]
        inc = 1.0 / torch.einsum("bhld,bhld->bhl", q + eps, k.cumsum(2) + eps)
        out_ = 1.0 / torch.einsum("bhld,bhld->bhl", k + eps, q.cumsum(2) + eps)
        sink = torch.einsum("bhld,bhld->bhl", q + eps, (k * (out_ * t)[..., None]).cumsum(2) + eps) / t
        src = (torch.einsum("bhld,bhld->bhl", k + eps, (q * (inc * t)[..., None]).cumsum(2) + eps) / t).clamp(-1, 1)
        alloc = torch.sigmoid(sink)
        e = torch.exp(src)
        comp = e / e.cumsum(-1) * t
        kv = torch.einsum("bhld,bhlm->bhldm", k, v * comp[..., None]).cumsum(2)
        x = torch.einsum("bhld,bhldm->bhlm", q * inc[..., None], kv) * alloc[..., None]
    return x.transpose(1, 2)


def ref_flow(q, k, v, causal=False, eps=1e-6):
    if _shared_ref_flow is not None:
        return _shared_ref_flow(q, k, v, causal=causal, eps=eps)
    return local_ref_flow(q, k, v, causal, eps)


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
def test_float32_close_to_float64(causal):
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


class _OriginalFlow(torch.nn.Module):
    """Flowformer's module layout (projections, [B,H,L,D] transposes, dropout after the output
    projection) around the local oracle, for state_dict parity."""

    def __init__(self, d_input, d_model, d_output, n_heads, drop_out=0.05, eps=1e-6, causal=False):
        super().__init__()
        self.n_heads, self.eps, self.causal = n_heads, eps, causal
        self.query_projection = torch.nn.Linear(d_input, d_model)
        self.key_projection = torch.nn.Linear(d_input, d_model)
        self.value_projection = torch.nn.Linear(d_input, d_model)
        self.out_projection = torch.nn.Linear(d_model, d_output)
        self.dropout = torch.nn.Dropout(drop_out)

    def forward(self, queries, keys, values):
        b, l, _ = queries.shape
        s = keys.shape[1]
        q = self.query_projection(queries).view(b, l, self.n_heads, -1)
        k = self.key_projection(keys).view(b, s, self.n_heads, -1)
        v = self.value_projection(values).view(b, s, self.n_heads, -1)
        x = local_ref_flow(q, k, v, self.causal, self.eps).reshape(b, l, -1)
        return self.dropout(self.out_projection(x))


@pytest.mark.parametrize("causal", [False, True])
def test_modules_load_flowformer_state_dict(causal):
    orig = _OriginalFlow(10, 16, 12, 4, causal=causal).double().eval()
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
