"""Flow-Attention's integration: torch ops (opcheck, compile, autograd Function), the numpy
API and bad input."""

import numpy as np
import pytest
import torch

import fastattn


def _qkv(b=1, tq=9, tk=11, h=2, d=4, dv=3, dtype=torch.float32):
    return (torch.randn(b, tq, h, d, dtype=dtype), torch.randn(b, tk, h, d, dtype=dtype),
            torch.randn(b, tk, h, dv, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_forward_and_backward_ops(causal, dtype):
    q, k, v = (t.requires_grad_(dtype != torch.bfloat16) for t in _qkv(tk=9 if causal else 11, dtype=dtype))
    torch.library.opcheck(torch.ops.fastattn.flow_attention_fwd.default, (q, k, v, causal, 1e-6))
    out = torch.ops.fastattn.flow_attention_fwd(q.detach(), k.detach(), v.detach(), causal, 1e-6)
    torch.library.opcheck(torch.ops.fastattn.flow_attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), causal, 1e-6))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_forward_and_backward(backend, causal, compiled_matches_eager):
    def f(q, k, v):
        return fastattn.flow_attention(q * 2, k, v, causal=causal).sin().sum()

    compiled_matches_eager(f, [t.requires_grad_(True) for t in _qkv(tk=9)], backend)


def test_compile_module_fullgraph():
    torch._dynamo.reset()
    m = fastattn.nn.FlowAttentionCausal(8, 16, 8, 4).eval()
    x = torch.randn(2, 10, 8)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x, x, x), m(x, x, x))


def test_autograd_function_matches_op():
    q, k, v = (t.double().requires_grad_(True) for t in _qkv())
    assert fastattn.autograd.FlowAttentionFunction is fastattn.FlowAttentionFunction
    out = fastattn.FlowAttentionFunction.apply(q, k, v, False, 1e-6)
    torch.testing.assert_close(out, fastattn.flow_attention(q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: fastattn.FlowAttentionFunction.apply(q, k, v), (q, k, v))


def test_meta_tensors_use_the_fake_impl():
    q, k, v = (t.to("meta") for t in _qkv(dtype=torch.bfloat16))
    out = fastattn.flow_attention(q, k, v)
    assert out.shape == (1, 9, 2, 3) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_numpy_matches_torch(dtype, causal):
    q, k, v = (t.numpy().astype(dtype) for t in _qkv(tk=9 if causal else 11))
    out = fastattn.numpy.flow_attention(q, k, v, causal=causal)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    np.testing.assert_array_equal(out, fastattn.flow_attention(tq, tk, tv, causal=causal).numpy())
    dout = np.random.randn(*out.shape).astype(dtype)
    got = fastattn.numpy.flow_attention_backward(dout, q, k, v, causal=causal)
    want = torch.ops.fastattn.flow_attention_bwd(torch.from_numpy(dout), tq, tk, tv, causal, 1e-6)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b.numpy())


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv()
    cases = [
        (dict(q=q[0]), ValueError, "q must be 4-D"),
        (dict(k=k[:, :, :1]), ValueError, "head counts"),
        (dict(v=v[:, :5]), ValueError, "k and v sequence lengths"),
        (dict(k=torch.randn(1, 11, 2, 5)), ValueError, "head_dim"),
        (dict(v=v.double()), TypeError, "v has dtype"),
        (dict(causal=True), ValueError, "causal"),
        (dict(causal="yes"), TypeError, "causal"),
        (dict(eps="x"), TypeError, "eps"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(q=torch.randn(2, 9, 2, 4)), ValueError, "batch"),
    ]
    for kw, exc, msg in cases:
        args = dict(q=q, k=k, v=v)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            fastattn.flow_attention(**args)
    with pytest.raises(ValueError, match="causal"):
        fastattn.nn.FlowAttentionCausal(4, 8, 4, 2)(torch.randn(1, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="n_heads"):
        fastattn.nn.FlowAttention(4, 10, 4, 3)


def test_binding_rejects_bad_lengths_without_panic():
    q, k, v = _qkv()
    out = torch.empty(1, 9, 2, 3)
    b = lambda t: (t.data_ptr(), t.numel())  # noqa: E731
    with pytest.raises(ValueError, match="buffer `k`"):
        fastattn._fastattn.flow_attention_forward("float32", (1, 9, 12, 2, 4, 3), False, 1e-6, 1, b(q), b(k), b(v), b(out))
    with pytest.raises(ValueError, match="causal"):
        fastattn._fastattn.flow_attention_forward("float32", (1, 9, 11, 2, 4, 3), True, 1e-6, 1, b(q), b(k), b(v), b(out))
