"""The neighborhood-attention reference: docs/neighborhood.md's worked windows, window invariants, NATTEN's
own CPU forward, and its argument errors."""

import pytest
import torch

from fastattn.reference import na1d, na2d, na3d, na_window, neighborhood_attention, neighborhood_mask


def test_spec_worked_examples():
    assert na_window(0, 10, 3) == [0, 1, 2]
    assert na_window(9, 10, 3) == [7, 8, 9]
    assert na_window(4, 10, 4, stride=2, is_causal=True) == [2, 3, 4]
    assert na_window(5, 10, 4, stride=2, is_causal=True) == [2, 3, 4, 5]
    for i in range(5):
        assert na_window(i, 10, 5, stride=5) == [0, 1, 2, 3, 4]
    for i in range(5, 10):
        assert na_window(i, 10, 5, stride=5) == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("length,k,s,d", [(10, 3, 1, 1), (11, 4, 2, 1), (17, 3, 3, 2), (12, 5, 1, 2), (9, 9, 1, 1)])
def test_window_invariants(length, k, s, d):
    for i in range(length):
        full = na_window(i, length, k, s, d, False)
        causal = na_window(i, length, k, s, d, True)
        # Non-causal windows never shrink and stay in the query's dilation group.
        assert len(full) == k and all(j % d == i % d for j in full) and full == sorted(full)
        assert all(0 <= j < length for j in full)
        # Causal windows end at the query and hold at most k keys.
        assert causal[-1] == i and 1 <= len(causal) <= k and all(j % d == i % d for j in causal)
        if s == 1:
            assert i in full


def test_mask_is_and_over_dimensions():
    m = neighborhood_mask((5, 6), (3, 4), (1, 2), (1, 1), (False, True))
    for qi in range(30):
        for kj in range(30):
            want = (kj // 6 in na_window(qi // 6, 5, 3)) and (kj % 6 in na_window(qi % 6, 6, 4, 2, 1, True))
            assert bool(m[qi, kj]) == want


natten = pytest.importorskip("natten")

NATTEN_CASES = [
    ((33,), 7, 1, 1, False),
    ((32,), 8, 3, 2, True),
    ((10,), 10, 1, 1, False),
    ((9, 11), (3, 4), (1, 2), (2, 1), (False, True)),
    ((12, 12), 5, 2, 2, False),
    ((8, 8), 8, 1, 1, (True, False)),
    ((5, 6, 7), (2, 3, 3), (2, 1, 3), (1, 2, 1), (True, False, True)),
    ((4, 6, 6), 3, 1, (1, 2, 2), False),
]


@pytest.mark.peer
@pytest.mark.parametrize("shape,k,s,d,c", NATTEN_CASES)
def test_matches_natten_cpu_forward(shape, k, s, d, c):
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(shape)]
    q, key, v = (torch.randn(2, *shape, 3, 32) for _ in range(3))
    want, want_lse = fn(q, key, v, kernel_size=k, stride=s, dilation=d, is_causal=c, scale=0.3, return_lse=True)
    got, lse = neighborhood_attention(q, key, v, k, s, d, c, scale=0.3, return_lse=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.peer
def test_matches_natten_with_additional_keys():
    q, key, v = (torch.randn(1, 6, 7, 2, 32) for _ in range(3))
    ak, av = torch.randn(1, 5, 2, 32), torch.randn(1, 5, 2, 32)
    try:
        want = natten.na2d(q, key, v, kernel_size=3, additional_keys=ak, additional_values=av)
    except Exception as e:  # pragma: no cover - depends on natten's CPU support
        pytest.skip(f"natten cannot run additional keys on CPU: {e}")
    got = na2d(q, key, v, 3, additional_keys=ak, additional_values=av)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_additional_keys_are_softmax_over_the_union():
    q, key, v = (torch.randn(1, 9, 2, 4, dtype=torch.float64) for _ in range(3))
    ak, av = torch.randn(1, 3, 2, 4, dtype=torch.float64), torch.randn(1, 3, 2, 4, dtype=torch.float64)
    got = na1d(q, key, v, 3, additional_keys=ak, additional_values=av)
    for i in range(9):
        idx = na_window(i, 9, 3)
        for h in range(2):
            keys = torch.cat([key[0, idx, h], ak[0, :, h]])
            vals = torch.cat([v[0, idx, h], av[0, :, h]])
            p = torch.softmax(keys @ q[0, i, h] * 0.5, 0)
            torch.testing.assert_close(got[0, i, h], p @ vals)


def test_gqa_uses_grouped_kv_heads():
    q = torch.randn(1, 8, 8, 4, 4, dtype=torch.float64)
    key, v = torch.randn(1, 8, 8, 2, 4, dtype=torch.float64), torch.randn(1, 8, 8, 2, 6, dtype=torch.float64)
    got = na2d(q, key, v, 3)
    want = na2d(q, key.repeat_interleave(2, -2), v.repeat_interleave(2, -2), 3)
    torch.testing.assert_close(got, want)
    assert got.shape == (1, 8, 8, 4, 6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=1), "kernel_size must be >= 2"),
        (dict(kernel_size=3, dilation=0), "dilation"),
        (dict(kernel_size=3, stride=4), "stride"),
        (dict(kernel_size=6, dilation=2), "exceeds the input size"),
        (dict(kernel_size=(3, 3)), "kernel_size has 2 entries"),
        (dict(kernel_size=3, is_causal=1), "is_causal"),
    ],
)
def test_argument_errors(kwargs, match):
    q = torch.randn(1, 10, 2, 4)
    with pytest.raises(ValueError, match=match):
        na1d(q, q, q, **kwargs)


def test_rank_errors():
    q = torch.randn(1, 6, 6, 2, 4)
    with pytest.raises(ValueError, match="na3d expects"):
        na3d(q, q, q, 3)
    with pytest.raises(ValueError, match="multiple"):
        na2d(q, q[..., :1, :].expand(1, 6, 6, 3, 4).contiguous(), q, 3)
