"""Hostile input across every public op: each bad tensor (wrong dtype, rank, shape, device,
layout or type), bad window argument, bad ``cu_seqlens`` or state must raise ``TypeError`` or
``ValueError`` whose message names the offending argument, before any kernel runs; never a
crash, a hang or a Rust panic's text. ``meta`` inputs give the right output shapes.

Each op is described once (its good call and its argument names); the tensor mutations are
generated for every tensor argument of every op."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch

import fastattn
from fastattn import nn as fnn


@dataclass
class Op:
    name: str
    call: Callable  # call(**args) -> result
    tensors: Callable[[], dict]  # fresh good tensor arguments by name
    options: dict = field(default_factory=dict)  # good non-tensor arguments
    # (argument, bad value, exception type) for its non-tensor arguments
    bad_options: list = field(default_factory=list)
    # tensor arguments whose shape mutations the op cannot detect on its own (none today)
    grad: bool = True


def _r(*shape):
    return torch.randn(*shape)


def _qkv(t=9, h=4, hkv=2, d=8, dv=6):
    return {"q": _r(1, t, h, d), "k": _r(1, t, hkv, d), "v": _r(1, t, hkv, dv)}


def _na(spatial=(7, 8), h=4, hkv=2, d=8, dv=6, extra=True):
    out = {"query": _r(1, *spatial, h, d), "key": _r(1, *spatial, hkv, d), "value": _r(1, *spatial, hkv, dv)}
    if extra:
        out["additional_keys"] = _r(1, 3, hkv, d)
        out["additional_values"] = _r(1, 3, hkv, dv)
    return out


def _hilo():
    return {"hi_qkv": _r(1, 5, 7, 24), "lo_q": _r(1, 5, 7, 12), "lo_kv": _r(1, 3, 4, 24)}


BAD_HILO = [
    ("window_size", 9, ValueError), ("window_size", 0, ValueError), ("window_size", 2.0, ValueError),
    ("window_size", "2", ValueError), ("window_size", None, ValueError), ("window_size", True, ValueError),
    ("head_dim", 0, ValueError), ("head_dim", -4, ValueError), ("head_dim", 4.0, ValueError),
    ("head_dim", 2**70, ValueError), ("scale", "big", TypeError), ("return_lse", "yes", TypeError),
]


def _lin():
    return {"q": torch.rand(1, 10, 2, 4), "k": torch.rand(1, 10, 2, 4), "v": _r(1, 10, 2, 3)}


BAD_WINDOW = [
    ("kernel_size", -3, ValueError), ("kernel_size", 0, ValueError), ("kernel_size", 1, ValueError),
    ("kernel_size", 2**70, ValueError), ("kernel_size", 3.0, ValueError), ("kernel_size", "3", ValueError),
    ("kernel_size", None, ValueError), ("kernel_size", True, ValueError), ("kernel_size", (3,), ValueError),
    ("kernel_size", (3, 3, 3), ValueError), ("kernel_size", torch.tensor(3), ValueError),
    ("stride", 0, ValueError), ("stride", -1, ValueError), ("stride", 4, ValueError), ("stride", 1.5, ValueError),
    ("dilation", 0, ValueError), ("dilation", -2, ValueError), ("dilation", 10**20, ValueError),
    ("dilation", 2.0, ValueError), ("is_causal", 1, ValueError), ("is_causal", "yes", ValueError),
    ("is_causal", (True,), ValueError), ("scale", "big", TypeError), ("scale", [1.0], TypeError),
    ("return_lse", "yes", TypeError),
]

BAD_CU = [
    ("cu_seqlens", torch.tensor([0, 7, 4, 10]), ValueError),  # not monotone
    ("cu_seqlens", torch.tensor([0.0, 10.0]), TypeError),  # not integer
    ("cu_seqlens", torch.tensor([0, 4, 9]), ValueError),  # wrong last value
    ("cu_seqlens", torch.tensor([-2, 4, 10]), ValueError),  # negative start
    ("cu_seqlens", torch.tensor([0, -1, 10]), ValueError),  # negative inside
    ("cu_seqlens", torch.tensor([[0, 10]]), ValueError),  # not 1-D
    ("cu_seqlens", torch.tensor([0]), ValueError),  # too short
    ("cu_seqlens", [0, 10], TypeError),  # not a tensor
    ("cu_seqlens", torch.tensor([0, 10]).to("meta"), ValueError),  # another device
    ("cu_seqlens", torch.tensor([True, True]), TypeError),
]

BAD_STATE = [
    ("initial_state", torch.zeros(1, 2, 4), ValueError),  # wrong shape
    ("initial_state", torch.zeros(1, 2, 4, 3, dtype=torch.int32), TypeError),
    ("initial_state", torch.zeros(1, 2, 4, 3, dtype=torch.complex64), TypeError),
    ("initial_state", np.zeros((1, 2, 4, 3)), TypeError),
    ("initial_state", (torch.zeros(1, 2, 4, 3),), ValueError),  # a pair of one
    ("initial_state", (torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4)), ValueError),  # bad z
    ("initial_state", (torch.zeros(1, 2, 4, 3), torch.zeros(1, 1, 2, 4), torch.zeros(1)), ValueError),
    ("initial_state", torch.zeros(1, 2, 4, 3).to("meta"), ValueError),
]

OPS = [
    Op("attention", lambda **a: fastattn.attention(**a), _qkv,
       {"is_causal": True, "scale": 0.3, "return_lse": True},
       [("is_causal", "yes", TypeError), ("is_causal", 1, TypeError), ("scale", "big", TypeError),
        ("scale", None + 0j if False else 1j, TypeError), ("return_lse", 2, TypeError)]),
    Op("AttentionFunction", lambda q, k, v, **a: fastattn.AttentionFunction.apply(q, k, v, a["is_causal"]),
       _qkv, {"is_causal": False}, [("is_causal", "no", TypeError)]),
    Op("na2d", lambda **a: fastattn.na2d(**a), _na, {"kernel_size": 3, "stride": (1, 2), "dilation": (2, 1),
                                                    "is_causal": (False, True), "return_lse": True},
       BAD_WINDOW),
    Op("na1d", lambda **a: fastattn.na1d(**a), lambda: _na(spatial=(11,)), {"kernel_size": 3},
       [b for b in BAD_WINDOW if b[1] != (3,) and b[1] != (True,)]),
    Op("na3d", lambda **a: fastattn.na3d(**a), lambda: _na(spatial=(4, 5, 6), extra=False), {"kernel_size": 3},
       BAD_WINDOW[:9]),
    Op("neighborhood_attention", lambda **a: fastattn.neighborhood_attention(**a), lambda: _na(extra=False),
       {"kernel_size": (3, 4)}, BAD_WINDOW[11:]),
    Op("NeighborhoodAttentionFunction",
       lambda query, key, value, additional_keys, additional_values, kernel_size:
       fastattn.NeighborhoodAttentionFunction.apply(query, key, value, kernel_size, 1, 1, False, None,
                                                    additional_keys, additional_values),
       _na, {"kernel_size": 3}, BAD_WINDOW[:9]),
    Op("linear_attention", lambda **a: fastattn.linear_attention(**a), _lin,
       {"output_final_state": True, "initial_state": None},
       BAD_CU + BAD_STATE + [
           ("feature_map", "softmax", ValueError), ("feature_map", 3, ValueError), ("scale", "s", TypeError),
           ("output_final_state", "yes", TypeError), ("normalize", None, TypeError), ("causal", 0, TypeError),
       ]),
    Op("LinearAttentionFunction",
       lambda q, k, v, **a: fastattn.LinearAttentionFunction.apply(q, k, v, None, a.get("initial_kv")),
       _lin, {}, [("initial_kv", torch.zeros(1, 2, 4), ValueError)]),
    Op("flow_attention", lambda **a: fastattn.flow_attention(**a), _qkv_flow := (lambda: {
        "q": _r(1, 9, 2, 8), "k": _r(1, 9, 2, 8), "v": _r(1, 9, 2, 6)}), {"causal": True},
       [("causal", "yes", TypeError), ("eps", -1.0, ValueError), ("eps", float("nan"), ValueError),
        ("eps", float("inf"), ValueError), ("eps", "tiny", TypeError)]),
    Op("hilo_attention", lambda **a: fastattn.hilo_attention(**a), _hilo,
       {"window_size": 2, "head_dim": 4, "return_lse": True}, BAD_HILO),
    Op("HiLoAttentionFunction",
       lambda hi_qkv, lo_q, lo_kv, window_size, head_dim: fastattn.HiLoAttentionFunction.apply(
           hi_qkv, lo_q, lo_kv, window_size, head_dim), _hilo, {"window_size": 2, "head_dim": 4}, BAD_HILO[:10]),
    Op("FlowAttentionFunction", lambda q, k, v, **a: fastattn.FlowAttentionFunction.apply(q, k, v, a["causal"]),
       _qkv_flow, {"causal": False}, [("causal", None, TypeError)]),
    Op("landmark_attention", lambda **a: fastattn.landmark_attention(**a), _qkv,
       {"block_size": 4, "scale": 0.3, "return_lse": True},
       [("block_size", 1, ValueError), ("block_size", 0, ValueError), ("block_size", -3, ValueError),
        ("block_size", 2.5, TypeError), ("block_size", True, TypeError), ("block_size", "4", TypeError),
        ("block_size", None, TypeError), ("scale", "x", TypeError), ("return_lse", 2, TypeError)]),
    Op("LandmarkAttentionFunction",
       lambda q, k, v, **a: fastattn.LandmarkAttentionFunction.apply(q, k, v, a["block_size"]),
       _qkv, {"block_size": 3}, [("block_size", 1, ValueError), ("block_size", 3.0, TypeError)]),
]

OPS_BY_NAME = {op.name: op for op in OPS}


def _mutations(t: torch.Tensor):
    """(label, bad tensor or value, expected exception) for one tensor argument."""
    yield "int32", t.to(torch.int32), TypeError
    yield "int64", t.to(torch.int64), TypeError
    yield "bool", t > 0, TypeError
    yield "complex", t.to(torch.complex64), TypeError
    yield "uint8", t.to(torch.uint8), TypeError
    yield "mixed float64", t.double(), TypeError
    yield "meta", t.to("meta"), ValueError
    yield "list", t.tolist(), TypeError
    yield "numpy", t.numpy(), TypeError
    yield "sparse", t.to_sparse(), TypeError
    yield "rank - 1", t[0], ValueError
    yield "rank + 1", t[None], ValueError
    yield "batch + 1", torch.cat([t, t]), ValueError
    yield "last dim - 1", t[..., :-1], ValueError
    yield "second to last - 1", t[..., :-1, :] if t.shape[-2] > 1 else t[..., :0, :], ValueError
    yield "last dim 0", t[..., :0], ValueError


def _tensor_cases():
    for op in OPS:
        for arg, good in op.tensors().items():
            for label, bad, err in _mutations(good):
                yield pytest.param(op.name, arg, label, bad, err, id=f"{op.name}-{arg}-{label}")


def _checked_call(op: Op, args: dict, err, arg: str):
    with pytest.raises(err) as info:
        op.call(**args)
    msg = str(info.value)
    assert re.search(rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])", msg), f"{arg!r} not named in: {msg}"
    assert "panick" not in msg and "internally" not in msg, msg


# Mutations that are legal for some arguments: a value head dim of its own (Dv != D), where
# no additional values pin it.
LEGAL = {(op, "v", "last dim - 1") for op in ("attention", "AttentionFunction", "flow_attention",
                                              "FlowAttentionFunction", "linear_attention",
                                              "LinearAttentionFunction", "landmark_attention",
                                              "LandmarkAttentionFunction")}
LEGAL |= {(op, "value", "last dim - 1") for op in ("na3d", "neighborhood_attention")}
# dense attention defines zero-width heads (empty or zero outputs); the other ops reject them
LEGAL |= {(op, "v", "last dim 0") for op in ("attention", "AttentionFunction")}


@pytest.mark.parametrize("op_name,arg,label,bad,err", list(_tensor_cases()))
def test_bad_tensor_names_the_argument(op_name, arg, label, bad, err):
    op = OPS_BY_NAME[op_name]
    args = {**op.tensors(), **op.options, arg: bad}
    if (op_name, arg, label) in LEGAL:
        op.call(**args)  # must simply work
        return
    _checked_call(op, args, err, arg)


def _option_cases():
    for op in OPS:
        for arg, bad, err in op.bad_options:
            yield pytest.param(op.name, arg, bad, err, id=f"{op.name}-{arg}-{bad!r:.40}")


@pytest.mark.parametrize("op_name,arg,bad,err", list(_option_cases()))
def test_bad_argument_names_the_argument(op_name, arg, bad, err):
    op = OPS_BY_NAME[op_name]
    args = {**op.tensors(), **op.options, arg: bad}
    _checked_call(op, args, err, arg)


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_good_call_works_and_meta_inputs_give_its_shapes(op):
    args = {**op.tensors(), **op.options}
    want = op.call(**args)
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    got = op.call(**meta)

    def shapes(x):
        if isinstance(x, torch.Tensor):
            return [(tuple(x.shape), x.dtype)]
        if isinstance(x, (tuple, list)):
            return [s for y in x for s in shapes(y)]
        return [None]

    assert shapes(got) == shapes(want)
    assert all(t.device.type == "meta" for t in (got if isinstance(got, tuple) else (got,))
               if isinstance(t, torch.Tensor))


def test_additional_keys_and_values_of_different_lengths():
    args = _na()
    args["additional_values"] = args["additional_values"][:, :2]
    with pytest.raises(ValueError, match="additional_keys and additional_values lengths differ"):
        fastattn.na2d(**args, kernel_size=3)
    args = _na()
    del args["additional_values"]
    with pytest.raises(ValueError, match="additional_keys and additional_values must be given together"):
        fastattn.na2d(**args, kernel_size=3)


def test_cu_seqlens_needs_batch_one():
    args = {k: torch.cat([v, v]) for k, v in _lin().items()}
    with pytest.raises(ValueError, match="cu_seqlens"):
        fastattn.linear_attention(**args, cu_seqlens=torch.tensor([0, 10]))


def test_state_with_the_wrong_mode():
    args = _lin()
    kv = torch.zeros(1, 2, 4, 3)
    with pytest.raises(TypeError, match="initial_state"):
        fastattn.linear_attention(**args, initial_state=(kv, torch.zeros(1, 1, 2, 4)), normalize=False)
    with pytest.raises(ValueError, match="initial_state"):
        fastattn.linear_attention(**args, initial_state=kv, causal=False)
    with pytest.raises(ValueError, match="output_final_state"):
        fastattn.linear_attention(**args, output_final_state=True, causal=False)


def test_flow_causal_needs_equal_lengths():
    with pytest.raises(ValueError, match="q 9, k 5"):
        fastattn.flow_attention(_r(1, 9, 2, 8), _r(1, 5, 2, 8), _r(1, 5, 2, 8), causal=True)


# --- modules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, err, name",
    [
        (lambda: fnn.NeighborhoodAttention2D(32, 5, 3), ValueError, "num_heads"),
        (lambda: fnn.NeighborhoodAttention2D(32, 0, 3), ValueError, "num_heads"),
        (lambda: fnn.NeighborhoodAttention2D(32, 4, 1), ValueError, "kernel_size"),
        (lambda: fnn.NeighborhoodAttention2D(32, 4, (3, 3, 3)), ValueError, "kernel_size"),
        (lambda: fnn.NeighborhoodAttention1D(32, 4, 3, stride=4), ValueError, "stride"),
        (lambda: fnn.NeighborhoodAttention3D(32, 4, 3, dilation=0), ValueError, "dilation"),
        (lambda: fnn.NeighborhoodAttention2D(32, 4, 3, is_causal="no"), ValueError, "is_causal"),
        (lambda: fnn.LinearAttention(32, 5), ValueError, "n_heads"),
        (lambda: fnn.LinearAttention(32, 4, feature_map="exp"), ValueError, "feature_map"),
        (lambda: fnn.LinearAttention(32, 0), ValueError, "n_heads"),
        (lambda: fnn.FlowAttention(32, 30, 32, 4), ValueError, "n_heads"),
        (lambda: fnn.FlowAttentionCausal(32, 32, 32, 0), ValueError, "n_heads"),
    ],
)
def test_module_construction_errors(build, err, name):
    with pytest.raises(err, match=name):
        build()


@pytest.mark.parametrize(
    "module, x, name",
    [
        (lambda: fnn.NeighborhoodAttention2D(32, 4, 3), _r(1, 8, 8, 16), "channels|embed_dim"),
        (lambda: fnn.NeighborhoodAttention2D(32, 4, 3), _r(1, 64, 32), "rank"),
        (lambda: fnn.NeighborhoodAttention2D(32, 4, 9), _r(1, 8, 8, 32), "kernel_size"),
        (lambda: fnn.NeighborhoodAttention1D(32, 4, 3), _r(1, 8, 32).int(), "dtype"),
        (lambda: fnn.LinearAttention(32, 4), _r(1, 8, 16), "x"),
        (lambda: fnn.LinearAttention(32, 4), _r(8, 32), "x"),
        (lambda: fnn.LinearAttention(32, 4), [[1.0] * 32], "x"),
    ],
)
def test_module_forward_errors(module, x, name):
    with pytest.raises((TypeError, ValueError), match=name):
        module()(x)


@pytest.mark.parametrize("cls", [fnn.FlowAttention, fnn.FlowAttentionCausal])
@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: (_r(1, 8, 16), _r(1, 8, 32), _r(1, 8, 32)), "queries"),
        (lambda: (_r(1, 8, 32), _r(2, 8, 32), _r(2, 8, 32)), "keys"),
        (lambda: (_r(1, 8, 32), _r(1, 8, 32), _r(1, 7, 32)), "values"),
        (lambda: (_r(8, 32), _r(8, 32), _r(8, 32)), "queries"),
    ],
)
def test_flow_module_forward_errors(cls, make, name):
    with pytest.raises(ValueError, match=name):
        cls(32, 32, 32, 4)(*make())


# --- numpy API ------------------------------------------------------------------------------


def _np(t):
    return t.numpy()


NUMPY = {
    "attention": (fastattn.numpy.attention, lambda: {k: _np(v) for k, v in _qkv().items()}),
    "hilo_attention": (lambda **a: fastattn.numpy.hilo_attention(**a, window_size=2, head_dim=4),
                       lambda: {k: _np(v) for k, v in _hilo().items()}),
    "flow_attention": (fastattn.numpy.flow_attention, lambda: {k: _np(v) for k, v in _qkv(h=2, hkv=2).items()}),
    "landmark_attention": (lambda **a: fastattn.numpy.landmark_attention(**a, block_size=4),
                           lambda: {k: _np(v) for k, v in _qkv().items()}),
    "linear_attention": (fastattn.numpy.linear_attention, lambda: {k: _np(v) for k, v in _lin().items()}),
    "neighborhood_attention": (lambda **a: fastattn.numpy.neighborhood_attention(**a, kernel_size=3),
                               lambda: {k: _np(v) for k, v in _na().items()}),
}


def _np_mutations(a: np.ndarray):
    yield "int32", a.astype(np.int32), TypeError
    yield "bool", a > 0, TypeError
    yield "complex", a.astype(np.complex64), TypeError
    yield "object", a.astype(object), TypeError
    yield "mixed float64", a.astype(np.float64), TypeError
    yield "torch", torch.from_numpy(a), TypeError
    yield "list", a.tolist(), TypeError
    yield "rank - 1", a[0], ValueError
    yield "batch + 1", np.concatenate([a, a]), ValueError


def _numpy_cases():
    for name, (_, make) in NUMPY.items():
        for arg, good in make().items():
            for label, bad, err in _np_mutations(good):
                yield pytest.param(name, arg, bad, err, id=f"numpy-{name}-{arg}-{label}")


@pytest.mark.parametrize("name,arg,bad,err", list(_numpy_cases()))
def test_numpy_bad_array_names_the_argument(name, arg, bad, err):
    fn, make = NUMPY[name]
    args = {**make(), arg: bad}
    with pytest.raises(err) as info:
        fn(**args)
    assert re.search(rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "call, err, name",
    [
        (lambda a: fastattn.numpy.linear_attention(**a, cu_seqlens=np.array([0, 7, 4, 10])), ValueError, "cu_seqlens"),
        (lambda a: fastattn.numpy.linear_attention(**a, cu_seqlens=np.array([0.0, 10.0])), ValueError, "cu_seqlens"),
        (lambda a: fastattn.numpy.linear_attention(**a, cu_seqlens=np.array([-1, 10])), ValueError, "cu_seqlens"),
        (lambda a: fastattn.numpy.linear_attention(**a, initial_kv=np.zeros((1, 2, 4))), ValueError, "initial_kv"),
        (lambda a: fastattn.numpy.linear_attention(**a, initial_kv=np.zeros((1, 2, 4, 3), np.int64)), TypeError,
         "initial_kv"),
        (lambda a: fastattn.numpy.linear_attention(**a, initial_z=torch.zeros(1, 1, 2, 4)), TypeError, "initial_z"),
        (lambda a: fastattn.numpy.linear_attention(**a, feature_map="tanh"), ValueError, "feature_map"),
    ],
)
def test_numpy_linear_arguments(call, err, name):
    with pytest.raises(err, match=name):
        call(NUMPY["linear_attention"][1]())


def test_numpy_backward_checks_its_extra_arrays():
    q, k, v = (_np(t) for t in _qkv().values())
    out, lse = fastattn.numpy.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="dout"):
        fastattn.numpy.attention_backward(out[:, :3], q, k, v, out, lse)
    with pytest.raises(ValueError, match="lse"):
        fastattn.numpy.attention_backward(out, q, k, v, out, lse[..., :1])
    with pytest.raises(ValueError, match="lse"):
        fastattn.numpy.attention_backward(out, q, k, v, out, lse.astype(np.float64))
    a = {k_: _np(t) for k_, t in _na(extra=False).items()}
    o, l = fastattn.numpy.neighborhood_attention(**a, kernel_size=3, return_lse=True)
    with pytest.raises(ValueError, match="out"):
        fastattn.numpy.neighborhood_attention_backward(o, a["query"], a["key"], a["value"], o[:, 1:], l, 3)
    with pytest.raises(ValueError, match="dout"):
        fastattn.numpy.flow_attention_backward(np.zeros((1, 2, 3, 4), np.float32), *(_np(t) for t in _qkv(h=2, hkv=2).values()))


# --- runtime controls -----------------------------------------------------------------------


def test_runtime_controls_reject_bad_values(monkeypatch):
    with pytest.raises(TypeError, match="level"):
        fastattn.set_simd_level(3)
    with pytest.raises(ValueError, match="SIMD level"):
        fastattn.set_simd_level("avx9000")
    with pytest.raises(ValueError, match="threads"):
        fastattn.measure_fma_peak(0)
    with pytest.raises(ValueError, match="threads"):
        fastattn.measure_fma_peak(2.5)
    with pytest.raises(ValueError, match="seconds"):
        fastattn.measure_fma_peak(1, seconds=-1)
    for bad in ("two", "0", "-3", "1.5"):
        monkeypatch.setenv("FASTATTN_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="FASTATTN_NUM_THREADS"):
            fastattn.attention(*_qkv().values())


def test_a_kernel_panic_is_an_exception_and_prints_nothing():
    """Even a bug (here a deliberate panic on a pool thread) reaches Python only as a
    RuntimeError with its message and place: nothing on stderr, also with RUST_BACKTRACE."""
    import os
    import subprocess
    import sys

    code = (
        "import fastattn\n"
        "from fastattn import _fastattn\n"
        "try:\n"
        "    _fastattn._panic_in_kernel_for_tests(2)\n"
        "except RuntimeError as e:\n"
        "    print('caught:', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RUST_BACKTRACE": "1"})
    assert res.returncode == 0, res.stderr
    assert "caught:" in res.stdout and "deliberate test panic" in res.stdout and "(at " in res.stdout
    assert "panicked" not in res.stderr and "backtrace" not in res.stderr, res.stderr
