"""Linear attention's integration: torch ops (opcheck, compile, autograd Function), the
numpy API, the LinearAttention module, and bad input."""

import numpy as np
import pytest
import torch

import fastattn
from fastattn.nn import LinearAttention


def _qkv(b=1, t=11, h=2, kd=4, vd=3, dtype=torch.float32):
    return (torch.rand(b, t, h, kd, dtype=dtype) + 0.1, torch.rand(b, t, h, kd, dtype=dtype) + 0.1,
            torch.randn(b, t, h, vd, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "states", "packed", "noncausal"])
def test_opcheck_forward_and_backward_ops(dtype, variant):
    grad = dtype != torch.bfloat16
    q, k, v = (x.requires_grad_(grad) for x in _qkv(dtype=dtype))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kv0 = z0 = cu = None
    n = 1
    if variant in ("states", "packed"):
        if variant == "packed":
            cu = torch.tensor([0, 4, 11], dtype=torch.int64)
            n = 2
        kv0 = torch.randn(n, 2, 4, 3, dtype=acc, requires_grad=grad)
        z0 = (torch.rand(n, 1, 2, 4, dtype=acc) + 0.1).requires_grad_(grad)
    causal = variant != "noncausal"
    args = (q, k, v, kv0, z0, cu, 0.5, True, causal, "elu1")
    torch.library.opcheck(torch.ops.fastattn.linear_attention_fwd.default, args)
    o, kv, z = torch.ops.fastattn.linear_attention_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    dout = torch.randn_like(o)
    dkv = torch.randn_like(kv) if causal else None
    det = lambda a: a.detach() if isinstance(a, torch.Tensor) else a  # noqa: E731
    torch.library.opcheck(
        torch.ops.fastattn.linear_attention_bwd.default,
        (dout, dkv, None, *(det(a) for a in args)),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(backend, compiled_matches_eager):
    def f(q, k, v, kv0, z0):
        o, (kv, z) = fastattn.linear_attention(q * 2, k, v, initial_state=(kv0, z0), output_final_state=True,
                                               feature_map="elu1")
        return o.sin().sum() + kv.sum() + z.sum()

    q, k, v = _qkv()
    kv0 = torch.randn(1, 2, 4, 3)
    z0 = torch.rand(1, 1, 2, 4)
    compiled_matches_eager(f, [x.requires_grad_(True) for x in (q, k, v, kv0, z0)], backend)


def test_autograd_function_matches_public_function():
    q, k, v = (x.double().requires_grad_(True) for x in _qkv())
    kv0 = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(1, 1, 2, 4, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert fastattn.autograd.LinearAttentionFunction is fastattn.LinearAttentionFunction
    o, kv, z = fastattn.LinearAttentionFunction.apply(q, k, v, 0.5, kv0, z0, True, None, True, "relu")
    o2, (kv2, z2) = fastattn.linear_attention(q, k, v, 0.5, (kv0, z0), True, True, feature_map="relu")
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(kv, kv2)
    assert torch.autograd.gradcheck(
        lambda *a: fastattn.LinearAttentionFunction.apply(a[0], a[1], a[2], 0.5, a[3], a[4], True, None, True, "relu"),
        (q, k, v, kv0, z0),
    )


def test_meta_tensors_use_the_fake_impl():
    q, k, v = (x.to("meta") for x in _qkv(dtype=torch.bfloat16))
    o, (kv, z) = fastattn.linear_attention(q, k, v, output_final_state=True)
    assert o.shape == (1, 11, 2, 3) and o.dtype == torch.bfloat16
    assert kv.shape == (1, 2, 4, 3) and kv.dtype == torch.float32 and z.shape == (1, 1, 2, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_numpy_matches_torch(dtype):
    q, k, v = (x.double() for x in _qkv(t=70))
    kv0 = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    z0 = torch.rand(1, 1, 2, 4, dtype=torch.float64)
    qn, kn, vn = (x.numpy().astype(dtype) for x in (q, k, v))
    o, fkv, fz = fastattn.numpy.linear_attention(qn, kn, vn, initial_kv=kv0.numpy(), initial_z=z0.numpy(),
                                                 feature_map="elu1")
    assert o.dtype == dtype
    tq, tk, tv = (torch.from_numpy(x) for x in (qn, kn, vn))
    wo, (wkv, wz) = fastattn.linear_attention(tq, tk, tv, initial_state=(kv0, z0), output_final_state=True,
                                              feature_map="elu1")
    np.testing.assert_allclose(o.astype(np.float64), wo.double().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fkv, wkv.numpy(), rtol=1e-6)
    np.testing.assert_allclose(fz, wz.numpy(), rtol=1e-6)
    dout = np.random.randn(*o.shape).astype(dtype)
    dq, dk, dv, dkv0, dz0 = fastattn.numpy.linear_attention_backward(
        dout, qn, kn, vn, initial_kv=kv0.numpy(), initial_z=z0.numpy(), feature_map="elu1")
    wdq, wdk, wdv, wdkv0, wdz0 = torch.ops.fastattn.linear_attention_bwd(
        torch.from_numpy(dout), None, None, tq, tk, tv, kv0.to(tq.dtype if dtype != np.float16 else torch.float32)
        if dtype == np.float64 else kv0.float(), z0.double() if dtype == np.float64 else z0.float(), None,
        4 ** -0.5, True, True, "elu1")
    for a, b in ((dq, wdq), (dk, wdk), (dv, wdv), (dkv0, wdkv0), (dz0, wdz0)):
        np.testing.assert_allclose(a.astype(np.float64), b.double().numpy(), rtol=1e-6, atol=1e-6)


def test_linear_attention_module():
    torch.manual_seed(0)
    m = LinearAttention(32, 4, feature_map="elu1").double()
    assert {n for n, _ in m.named_parameters()} == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    y, st = m(x, output_final_state=True)
    assert y.shape == (2, 17, 32)
    # Decoding the last token from the state of the first 16 equals the full pass.
    y16, st16 = m(x[:, :16], output_final_state=True)
    y1, _ = m(x[:, 16:], initial_state=st16)
    torch.testing.assert_close(y1, y[:, 16:])
    y.sum().backward()
    assert m.q_proj.weight.grad is not None
    nc = LinearAttention(32, 4, head_dim=5, v_head_dim=6, causal=False, d_output=7, bias=True)
    assert nc(torch.randn(1, 9, 32))[0].shape == (1, 9, 7)


# --- bad input ----------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv()
    cases = [
        (dict(q=q[0]), ValueError, "q must be 4-D"),
        (dict(k=k[:, :5]), ValueError, "k must have the shape of q"),
        (dict(v=v[:, :5]), ValueError, "v must be"),
        (dict(v=v.double()), TypeError, "v has dtype"),
        (dict(q=q.int()), TypeError, "q has dtype"),
        (dict(feature_map="softmax"), ValueError, "feature_map"),
        (dict(feature_map=3), ValueError, "feature_map"),
        (dict(scale="x"), TypeError, "scale"),
        (dict(normalize=1), TypeError, "normalize"),
        (dict(causal=None), TypeError, "causal"),
        (dict(output_final_state="yes"), TypeError, "output_final_state"),
        (dict(cu_seqlens=torch.tensor([0.0, 11.0])), TypeError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 6, 5, 11])), ValueError, "sorted"),
        (dict(cu_seqlens=torch.tensor([[0, 11]])), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=[0, 11]), TypeError, "cu_seqlens"),
        (dict(initial_state=torch.randn(1, 2, 4, 4)), ValueError, "initial_state"),
        (dict(initial_state=(torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4))), ValueError, r"initial_state\[1\]"),
        (dict(initial_state=(torch.randn(1, 2, 4, 3), torch.randn(1, 1, 2, 4)), normalize=False), TypeError,
         "initial_state"),
        (dict(initial_state=[1, 2, 3]), ValueError, "initial_state"),
        (dict(initial_state="s"), TypeError, "initial_state"),
        (dict(initial_state=torch.randn(1, 2, 4, 3), causal=False), ValueError, "initial_state"),
        (dict(output_final_state=True, causal=False), ValueError, "output_final_state"),
    ]
    for kw, exc, msg in cases:
        args = dict(q=q, k=k, v=v)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            fastattn.linear_attention(**args)
    q2, k2, v2 = _qkv(b=2)
    with pytest.raises(ValueError, match="batch size 1"):
        fastattn.linear_attention(q2, k2, v2, cu_seqlens=torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="initial_state"):  # one state per packed sequence
        fastattn.linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 3, 11]), initial_state=torch.randn(1, 2, 4, 3))


def test_numpy_bad_inputs():
    q, k, v = (x.numpy() for x in _qkv())
    with pytest.raises(TypeError, match="k has dtype"):
        fastattn.numpy.linear_attention(q, k.astype(np.float64), v)
    with pytest.raises(ValueError, match="feature_map"):
        fastattn.numpy.linear_attention(q, k, v, feature_map="gelu")
    with pytest.raises(ValueError, match="cu_seqlens"):
        fastattn.numpy.linear_attention(q, k, v, cu_seqlens=np.array([0, 12]))
    with pytest.raises(ValueError, match="initial_kv"):
        fastattn.numpy.linear_attention(q, k, v, initial_kv=np.zeros((1, 2, 4, 4), np.float32))


def test_binding_rejects_bad_lengths_without_panic():
    q, k, v = _qkv()
    out = torch.empty(1, 11, 2, 3)
    kv, z = torch.empty(1, 2, 4, 3), torch.empty(1, 1, 2, 4)
    b = lambda t: (t.data_ptr(), t.numel())  # noqa: E731
    with pytest.raises(ValueError, match="buffer `v`"):
        fastattn._fastattn.linear_attention_forward("float32", (1, 11, 2, 4, 4), 0.5, True, True, "identity", 1,
                                                    b(q), b(k), b(v), None, None, None, b(out), b(kv), b(z))
    with pytest.raises(ValueError, match="feature_map"):
        fastattn._fastattn.linear_attention_forward("float32", (1, 11, 2, 4, 3), 0.5, True, True, "tanh", 1,
                                                    b(q), b(k), b(v), None, None, None, b(out), b(kv), b(z))
    cu = torch.tensor([0, 7, 3, 11])
    with pytest.raises(ValueError, match="cu_seqlens"):
        fastattn._fastattn.linear_attention_forward("float32", (1, 11, 2, 4, 3), 0.5, True, True, "identity", 1,
                                                    b(q), b(k), b(v), None, None, b(cu), b(out),
                                                    b(torch.empty(3, 2, 4, 3)), b(torch.empty(3, 1, 2, 4)))
