"""Neighborhood attention: outputs, lse and every gradient against the float64 reference, on
fixed awkward shapes and a seeded random sweep (dozens of cases here, hundreds with
FASTATTN_EXTENDED=1), plus natten's CPU forward in fp32 and float64 gradcheck."""

import random

import pytest
import torch

import fastattn
from fastattn.reference import neighborhood_attention as ref_na

# (batch, spatial, Hq, Hkv, D, Dv, n_additional, kernel, stride, dilation, causal)
FIXED = [
    (1, (2,), 1, 1, 8, 8, 0, 2, 1, 1, False),
    (2, (37,), 2, 1, 16, 24, 0, 7, 1, 1, False),
    (1, (37,), 2, 2, 16, 16, 0, 8, 3, 2, True),
    (1, (200,), 1, 1, 32, 32, 0, 63, 1, 1, False),  # longer than one 1-D tile's key box
    (1, (31,), 4, 2, 8, 8, 3, 31, 1, 1, False),  # kernel == input, additional keys
    (1, (11, 13), 2, 2, 16, 16, 0, (3, 4), (1, 2), (2, 1), (False, True)),
    (1, (17, 9), 4, 1, 8, 12, 0, 9, 1, 1, False),  # kernel == one dim, MQA
    (2, (14, 14), 2, 2, 32, 32, 5, 5, 5, 1, False),  # blocked attention (stride == kernel)
    (1, (20, 19), 1, 1, 16, 16, 0, (4, 6), 2, 3, True),
    (1, (5, 6, 7), 2, 1, 8, 8, 0, (2, 3, 3), (2, 1, 3), (1, 2, 1), (True, False, True)),
    (1, (6, 9, 8), 2, 2, 16, 8, 2, 3, 1, (1, 2, 2), False),
    (1, (4, 4, 4), 1, 1, 8, 8, 0, 4, 1, 1, (False, True, False)),
]

# Shapes the AVX-512 lanes forward takes (fp32 / half, 2-D, stride 1 along the last
# dimension, windows up to 16 there, lines of at least 12): line edges, causal lines, even
# kernels, dilation, outer stride, kernel == one dimension, GQA, odd head dims.
LANES = [
    (2, (20, 33), 2, 1, 32, 32, 0, 7, 1, 1, False),
    (1, (12, 40), 2, 2, 16, 24, 0, (4, 6), 1, (1, 2), True),
    (1, (6, 29), 1, 1, 8, 5, 0, (2, 5), (2, 1), (2, 1), (True, True)),
    (1, (3, 100), 3, 1, 17, 9, 0, (2, 13), 1, 1, (False, True)),
    (1, (16, 18), 2, 1, 16, 16, 0, (16, 8), (4, 1), 1, False),
]


def _random_lanes_case(rng: random.Random):
    """A random 2-D shape inside the lanes forward's range (lines of 12+, window <= 16 along
    them, stride 1 there, no additional keys)."""
    d1 = rng.choice((1, 1, 2))
    n1 = rng.randint(2 * d1, 24)
    d2 = rng.choice((1, 1, 2))
    n2 = rng.randint(12 * d2, 50)
    k1 = rng.randint(2, min(9, n1 // d1))
    k2 = rng.randint(2, min(16, n2 // d2))
    s1 = rng.randint(1, k1) if rng.random() < 0.3 else 1
    causal = (rng.random() < 0.3, rng.random() < 0.3)
    hkv = rng.choice((1, 2))
    hq = hkv * rng.choice((1, 2))
    d = rng.choice((8, 16, 32, 33))
    dv = d if rng.random() < 0.7 else rng.choice((5, 16))
    return (rng.randint(1, 2), (n1, n2), hq, hkv, d, dv, 0, (k1, k2), (s1, 1), (d1, d2), causal)


LANES_SWEEP = [_random_lanes_case(random.Random(5000 + i)) for i in range(100)]

# Shapes the AVX-512 3-D lane path takes (fp32 / half, windows up to 64 keys and 16 along
# the last dimension, stride 1 there, lines at least 3/4 of their 16-lane blocks): partial
# blocks, line edges, causal and even kernels, a kernel as long as its dimension, stride,
# dilation, GQA, odd head dims.
CUBE = [
    (2, (5, 7, 28), 2, 1, 16, 24, 0, 3, 1, 1, False),
    (1, (6, 9, 37), 2, 2, 8, 8, 0, (2, 3, 5), (2, 1, 1), (1, 2, 1), (True, False, True)),
    (2, (4, 5, 16), 2, 2, 17, 9, 0, 4, 1, 1, False),
    (1, (7, 6, 26), 2, 2, 12, 12, 0, (3, 2, 3), (3, 1, 1), (2, 1, 2), (False, True, False)),
    (2, (3, 4, 12), 2, 2, 16, 16, 0, (2, 2, 12), (1, 2, 1), 1, (False, False, True)),
]


def _random_cube_case(rng: random.Random):
    """A random 3-D shape inside the 3-D lane path's range."""
    while True:
        n = (rng.randint(2, 8), rng.randint(2, 10), rng.randint(12, 40))
        dil = tuple(rng.choice((1, 1, 2)) if n[i] >= 4 else 1 for i in range(2)) + (
            rng.choice((1, 1, 2)) if n[2] >= 24 else 1,
        )
        group = [-(-n[i] // dil[i]) for i in range(3)]
        if 4 * group[2] < 3 * -(-group[2] // 16) * 16:
            continue
        ks = tuple(rng.randint(2, min(4 if i < 2 else 16, n[i] // dil[i])) for i in range(3))
        if ks[0] * ks[1] * ks[2] > 64:
            continue
        ss = (rng.randint(1, ks[0]) if rng.random() < 0.3 else 1, 1, 1)
        causal = tuple(rng.random() < 0.25 for _ in range(3))
        hkv = rng.choice((1, 2))
        hq = hkv * rng.choice((1, 2))
        d = rng.choice((8, 16, 33))
        dv = d if rng.random() < 0.7 else rng.choice((5, 16))
        return (rng.randint(1, 2), n, hq, hkv, d, dv, 0, ks, ss, dil, causal)


CUBE_SWEEP = [_random_cube_case(random.Random(7000 + i)) for i in range(60)]


def _random_case(rng: random.Random):
    rank = rng.choice((1, 1, 2, 2, 2, 3))
    spatial, ks, ss, ds, cs = [], [], [], [], []
    max_len = {1: 90, 2: 20, 3: 8}[rank]
    for _ in range(rank):
        length = rng.randint(2, max_len)
        d = rng.choice((1, 1, 1, 2, 3)) if length >= 4 else 1
        d = min(d, length // 2)
        k = rng.randint(2, length // d)
        s = rng.randint(1, k) if rng.random() < 0.3 else 1
        spatial.append(length)
        ks.append(k)
        ss.append(s)
        ds.append(d)
        cs.append(rng.random() < 0.3)
    hkv = rng.choice((1, 2))
    hq = hkv * rng.choice((1, 1, 2))
    d = rng.choice((4, 8, 16, 33))
    dv = d if rng.random() < 0.7 else rng.choice((5, 16))
    extra = rng.choice((0, 0, 0, 1, 4))
    return (rng.randint(1, 2), tuple(spatial), hq, hkv, d, dv, extra, tuple(ks), tuple(ss), tuple(ds), tuple(cs))


def _ids(c):
    b, sp, hq, hkv, d, dv, x, k, s, dil, cz = c
    return f"B{b}-{'x'.join(map(str, sp))}-H{hq}/{hkv}-D{d}/{dv}-x{x}-k{k}-s{s}-d{dil}-c{cz}".replace(" ", "")


SWEEP = [_random_case(random.Random(1000 + i)) for i in range(300)]


def _inputs(case, dtype):
    b, spatial, hq, hkv, d, dv, extra, *_ = case
    q = torch.randn(b, *spatial, hq, d, dtype=dtype)
    k = torch.randn(b, *spatial, hkv, d, dtype=dtype)
    v = torch.randn(b, *spatial, hkv, dv, dtype=dtype)
    ak = av = None
    if extra:
        ak = torch.randn(b, extra, hkv, d, dtype=dtype)
        av = torch.randn(b, extra, hkv, dv, dtype=dtype)
    return q, k, v, ak, av


def _window(case):
    return case[7:11]


def _check_against_reference(case, atol):
    q, k, v, ak, av = _inputs(case, torch.float64)
    window = _window(case)
    leaves = [t.requires_grad_(True) for t in (q, k, v, ak, av) if t is not None]
    out, lse = fastattn.neighborhood_attention(q, k, v, *window, scale=0.37, additional_keys=ak,
                                               additional_values=av, return_lse=True)
    ref_out, ref_lse = ref_na(q, k, v, *window, scale=0.37, additional_keys=ak, additional_values=av,
                              return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=0)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref_out, leaves, dout)
    for name, g, w in zip("q k v ak av".split(), got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=0, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("case", FIXED, ids=_ids)
def test_fixed_cases_match_reference_float64(case, simd_level):
    _check_against_reference(case, 1e-10)


@pytest.mark.parametrize("case", SWEEP[:36], ids=_ids)
def test_random_sweep_matches_reference_float64(case):
    _check_against_reference(case, 1e-10)


@pytest.mark.extended
@pytest.mark.parametrize("case", SWEEP[36:], ids=_ids)
def test_random_sweep_extended(case):
    _check_against_reference(case, 1e-10)


@pytest.mark.parametrize("case", FIXED[1:10], ids=_ids)
def test_fp32_forward_and_grads_close_to_float64_reference(case):
    _check_fp32(case)


@pytest.mark.parametrize("case", LANES, ids=_ids)
def test_lanes_shapes_fp32_close_to_float64_reference(case, simd_level):
    _check_fp32(case)


@pytest.mark.parametrize("case", CUBE, ids=_ids)
def test_cube_shapes_fp32_close_to_float64_reference(case, simd_level):
    _check_fp32(case)


@pytest.mark.parametrize("case", CUBE_SWEEP[:8], ids=_ids)
def test_cube_random_fp32_close_to_float64_reference(case):
    _check_fp32(case)


@pytest.mark.extended
@pytest.mark.parametrize("case", CUBE_SWEEP[8:], ids=_ids)
def test_cube_random_fp32_extended(case):
    _check_fp32(case)


@pytest.mark.parametrize("case", LANES_SWEEP[:12], ids=_ids)
def test_lanes_random_fp32_close_to_float64_reference(case):
    _check_fp32(case)


@pytest.mark.extended
@pytest.mark.parametrize("case", LANES_SWEEP[12:], ids=_ids)
def test_lanes_random_fp32_extended(case):
    _check_fp32(case)


def _check_fp32(case):
    q, k, v, ak, av = _inputs(case, torch.float32)
    window = _window(case)
    leaves32 = [t.requires_grad_(True) for t in (q, k, v, ak, av) if t is not None]
    out, lse = fastattn.neighborhood_attention(q, k, v, *window, additional_keys=ak, additional_values=av,
                                               return_lse=True)
    assert out.dtype == lse.dtype == torch.float32
    q64, k64, v64, ak64, av64 = (None if t is None else t.detach().double().requires_grad_(True)
                                 for t in (q, k, v, ak, av))
    ref_out, ref_lse = ref_na(q64, k64, v64, *window, additional_keys=ak64, additional_values=av64,
                              return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves32, dout)
    leaves64 = [t for t in (q64, k64, v64, ak64, av64) if t is not None]
    want = torch.autograd.grad(ref_out, leaves64, dout.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [FIXED[1], FIXED[5], FIXED[9], *LANES[:2], *CUBE[:2]], ids=_ids)
def test_half_precision_within_multiple_of_reference_in_dtype(case, dtype, simd_level):
    q, k, v, ak, av = _inputs(case, dtype)
    window = _window(case)
    out = fastattn.neighborhood_attention(q, k, v, *window)
    assert out.dtype == dtype
    ref64 = ref_na(q.double(), k.double(), v.double(), *window)
    ref_lowp = ref_na(q, k, v, *window)
    err = (out.double() - ref64).abs().max().item()
    err_lowp = (ref_lowp.double() - ref64).abs().max().item()
    assert err <= 2 * err_lowp + 1e-3, (err, err_lowp)
    # The backward runs in half precision too and stays close to float64 gradients.
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    dout = torch.randn_like(out)
    got = torch.autograd.grad(fastattn.neighborhood_attention(*leaves, *window), leaves, dout)
    l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(ref_na(*l64, *window), l64, dout.double())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert (g.double() - w).abs().max().item() <= 0.05 * w.abs().max().item() + 0.05


@pytest.mark.parametrize(
    "case",
    [
        (1, (5,), 2, 1, 3, 2, 2, 3, 1, 1, False),
        (1, (6,), 1, 1, 4, 4, 0, 4, 2, 1, True),
        (1, (4, 5), 2, 2, 3, 3, 1, (2, 3), (1, 2), (2, 1), (True, False)),
        (1, (3, 3, 4), 1, 1, 2, 3, 0, (2, 2, 3), 1, (1, 1, 1), (False, True, False)),
    ],
    ids=_ids,
)
def test_gradcheck_float64(case):
    q, k, v, ak, av = _inputs(case, torch.float64)
    window = _window(case)
    if ak is None:
        fn = lambda q, k, v: fastattn.neighborhood_attention(q, k, v, *window)  # noqa: E731
        args = (q, k, v)
    else:
        fn = lambda q, k, v, ak, av: fastattn.neighborhood_attention(  # noqa: E731
            q, k, v, *window, additional_keys=ak, additional_values=av)
        args = (q, k, v, ak, av)
    args = tuple(t.requires_grad_(True) for t in args)
    assert torch.autograd.gradcheck(fn, args)


natten = pytest.importorskip("natten")

NATTEN_CASES = [
    ((4096,), 63, 1, 1, False, 16),
    ((97,), 8, 3, 2, True, 32),
    ((23, 19), (7, 5), (1, 2), (2, 3), (False, True), 32),
    ((28, 28), 7, 1, 1, False, 32),
    ((7, 9, 10), 3, (1, 2, 1), (2, 1, 3), (True, False, False), 64),
]


@pytest.mark.peer
@pytest.mark.parametrize("spatial,k,s,d,c,hd", NATTEN_CASES)
def test_fp32_forward_matches_natten_cpu(spatial, k, s, d, c, hd):
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(spatial)]
    ours = {1: fastattn.na1d, 2: fastattn.na2d, 3: fastattn.na3d}[len(spatial)]
    q, key, v = (torch.randn(1, *spatial, 2, hd) for _ in range(3))
    want, want_lse = fn(q, key, v, kernel_size=k, stride=s, dilation=d, is_causal=c, return_lse=True)
    got, lse = ours(q, key, v, kernel_size=k, stride=s, dilation=d, is_causal=c, return_lse=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-4)
