"""What one small call costs: a decode-sized linear-attention step (T=1 with a state) and a
tiny na2d, timed through the public function and through the bare binding (the kernel alone,
no validation, dispatch or allocation), so the Python-side cost is their difference.

    .venv/bin/python benches/overhead.py
"""

from __future__ import annotations

import time

import torch

import fastattn
from fastattn import _checks
from fastattn._native import lib
from fastattn._torch import buf


def _per_call_us(fn, calls: int = 2000, rounds: int = 7) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def _cases():
    threads = fastattn.num_threads()
    q = torch.randn(1, 1, 8, 64)
    kv = torch.randn(1, 8, 64, 64)
    o, fkv, fz = torch.empty(1, 1, 8, 64), torch.empty(1, 8, 64, 64), torch.empty(1, 1, 8, 64)

    def decode():
        return fastattn.linear_attention(q, q, q, normalize=False, feature_map="elu1", initial_state=kv,
                                         output_final_state=True)

    def decode_kernel():
        lib.linear_attention_forward("float32", (1, 1, 8, 64, 64), 0.125, True, False, "elu1", threads,
                                     buf(q), buf(q), buf(q), buf(kv), None, None, buf(o), buf(fkv), buf(fz))

    x = torch.randn(1, 8, 8, 2, 16)
    out, lse = torch.empty_like(x), torch.empty(x.shape[:-1])
    dims = _checks.na_dims(x.shape, x.shape, x.shape)
    window = ([3, 3], [1, 1], [1, 1], [False, False], 0.25)

    def na():
        return fastattn.na2d(x, x, x, 3)

    def na_kernel():
        lib.na_forward("float32", dims, window, threads, buf(x), buf(x), buf(x), (0, 0), (0, 0), buf(out), buf(lse))

    return [
        ("linear decode step B1 H8 K64 V64 (T=1, state)", decode, decode_kernel),
        ("na2d B1 H2 8x8 D16 k3", na, na_kernel),
    ]


def measure() -> list[tuple[str, float, float]]:
    """``(case, µs per public call, µs per kernel call)`` for each small case."""
    return [(name, _per_call_us(full), _per_call_us(kernel)) for name, full, kernel in _cases()]


def report() -> None:
    print("per-call cost of small calls (forward, no grad; best of 7 rounds of 2000 calls):")
    for name, full, kernel in measure():
        print(f"  {name:<46} {full:6.1f} us per call = kernel {kernel:5.1f} us + Python side {full - kernel:5.1f} us")


if __name__ == "__main__":
    torch.set_num_threads(2)
    report()
