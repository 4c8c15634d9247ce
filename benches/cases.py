"""Benchmark cases shared by the pytest-benchmark suite and the main-job table.

A case builds its inputs once and offers, per implementation (fastattn and each peer), a
forward callable and optionally a backward callable (gradients of a saved forward graph),
plus the useful FLOPs of one forward, so rates are comparable across implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import fastattn


@dataclass
class Impl:
    forward: Callable[[], object]
    backward: Callable[[], object] | None = None


@dataclass
class Case:
    op: str
    shape: str
    flops_fwd: float  # useful FLOPs of one forward
    bwd_factor: float  # backward FLOPs = bwd_factor * forward FLOPs
    impls: dict[str, Impl] = field(default_factory=dict)


def _grad_of(fn, inputs):
    """A callable computing d(inputs) of fn(*inputs) for a fixed random upstream gradient,
    reusing one saved forward graph so only the backward pass is timed. The graph is built on
    the first (warm-up) call, so listing cases costs nothing."""
    saved = {}

    def backward():
        if not saved:
            xs = [t.detach().requires_grad_(True) for t in inputs]
            out = fn(*xs)
            saved.update(xs=xs, out=out, dout=torch.randn_like(out))
        return torch.autograd.grad(saved["out"], saved["xs"], saved["dout"], retain_graph=True)

    return backward


def attention_cases(ts=(512, 2048, 8192), b=1, h=8, d=64, dtype=torch.float32) -> list[Case]:
    cases = []
    for t in ts:
        for causal in (False, True):
            q, k, v = (torch.randn(b, t, h, d, dtype=dtype) for _ in range(3))
            # SDPA takes [B, H, T, D]; its own layout is given to it so no copy is timed.
            qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

            def ours(q, k, v, causal=causal):
                return fastattn.attention(q, k, v, is_causal=causal)

            def sdpa(q, k, v, causal=causal):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
            case = Case("attention", f"B{b} H{h} T{t} D{d}{' causal' if causal else ''}", flops, 2.5)
            case.impls["fastattn"] = Impl(lambda q=q, k=k, v=v, f=ours: f(q, k, v), _grad_of(ours, (q, k, v)))
            case.impls["torch_sdpa"] = Impl(lambda q=qh, k=kh, v=vh, f=sdpa: f(q, k, v), _grad_of(sdpa, (qh, kh, vh)))
            cases.append(case)
    return cases


FAMILIES: dict[str, Callable[..., list[Case]]] = {
    "attention": attention_cases,
}
