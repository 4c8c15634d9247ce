"""The eager fast path: a forward that records no gradient runs its CPU kernel without the
torch dispatcher (cheaper small calls), and gives the same numbers as the op; whenever
something could observe the dispatcher (autograd, modes, fake tensors, compile, profiler),
calls go through ``torch.ops.fastattn`` instead."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn._torch import direct


def _calls():
    """(name, public call, the same call through the op) for every family's forward."""
    q, k, v = (torch.randn(1, 40, 4, 16) for _ in range(3))
    x = torch.randn(1, 9, 10, 4, 16)
    ak, av = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16)
    kv0 = torch.randn(1, 4, 16, 16)
    hq, lq, lkv, pad = torch.randn(1, 9, 7, 96), torch.randn(1, 9, 7, 32), torch.randn(1, 5, 4, 64), torch.randn(64)
    ops = torch.ops.fastattn
    return [
        ("attention", lambda: fastattn.attention(q, k, v, is_causal=True, return_lse=True),
         lambda: ops.attention_fwd(q, k, v, 0.25, True)),
        ("na2d", lambda: fastattn.na2d(x, x, x, (3, 4), dilation=(2, 1), is_causal=(False, True),
                                       additional_keys=ak, additional_values=av, return_lse=True),
         lambda: ops.na_fwd(x, x, x, ak, av, [3, 4], [1, 1], [2, 1], [False, True], 0.25)),
        ("linear", lambda: fastattn.linear_attention(q.sigmoid(), k.sigmoid(), v, initial_state=kv0,
                                                     output_final_state=True, normalize=False),
         lambda: ops.linear_attention_fwd(q.sigmoid(), k.sigmoid(), v, kv0, None, None, 0.25, False, True,
                                          "identity")),
        ("flow", lambda: fastattn.flow_attention(q, k, v, causal=True),
         lambda: ops.flow_attention_fwd(q, k, v, True, 1e-6)),
        ("hilo", lambda: fastattn.hilo_attention(hq, lq, lkv, 2, 16, hi_pad_kv=pad, return_lse=True),
         lambda: ops.hilo_fwd(hq, pad, lq, lkv, 2, 16, 0.25)),
        ("landmark", lambda: fastattn.landmark_attention(q, k, v, 8, return_lse=True),
         lambda: ops.landmark_fwd(q, k, v, 8, 0.25)),
    ]


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flat(y)]
    return []


@pytest.mark.parametrize("name,public,through_op", _calls(), ids=[c[0] for c in _calls()])
def test_fast_path_equals_the_op(name, public, through_op):
    got, want = _flat(public()), _flat(through_op())
    if name == "linear":  # the op also returns z; the public call drops it without normalize
        want = want[:2]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,public,through_op", _calls(), ids=[c[0] for c in _calls()])
def test_dispatch_modes_see_the_op(name, public, through_op):
    with _Recorder() as rec:
        public()
    assert any(op.startswith("fastattn.") for op in rec.ops), rec.ops


def test_profiler_sees_the_op():
    q = torch.randn(1, 32, 2, 16)
    with torch.profiler.profile() as prof:
        fastattn.attention(q, q, q)
    assert any("fastattn::attention_fwd" in e.name for e in prof.events())


def test_when_the_fast_path_applies():
    t = torch.randn(2, 3)
    assert direct(t, None, t)
    assert not direct(t, t.clone().requires_grad_(True))
    with torch.no_grad():
        assert direct(t, t.clone().requires_grad_(True))
    assert not direct(torch.nn.Parameter(t.clone(), requires_grad=False))  # a subclass
    assert not direct(t.to("meta"))
    with _Recorder():
        assert not direct(t)
    with torch.profiler.profile():
        assert not direct(t)


def test_fake_tensors_and_compile_take_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.randn(1, 12, 2, 8)
        out = fastattn.attention(q, q, q)
    assert out.shape == (1, 12, 2, 8)
    x = torch.randn(1, 6, 7, 2, 8)
    f = torch.compile(lambda x: fastattn.na2d(x, x, x, 3) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), fastattn.na2d(x, x, x, 3) * 2, atol=0, rtol=0)
