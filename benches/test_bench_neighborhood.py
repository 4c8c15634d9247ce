"""Neighborhood attention vs natten (CPU forward), compiled flex attention with a block
mask, SDPA with a boolean mask and the plain reference, forward and backward, one
pytest-benchmark group per shape and direction. The largest shapes live in the main-job
table (``./scripts/bench.sh --family neighborhood``)."""

import pytest

from cases import neighborhood_cases

CASES = neighborhood_cases(shapes=[
    (1, (1024,), 4, 64, 63, 1),
    (1, (28, 28), 4, 32, 7, 1),
    (1, (8, 8, 8), 4, 64, 3, 1),
])
PARAMS = [
    pytest.param(case, direction, impl, id=f"{case.op}-{case.shape.replace(' ', '-')}-{direction}-{impl}")
    for case in CASES
    for direction in ("fwd", "bwd")
    for impl, fns in case.impls.items()
    if (fns.forward if direction == "fwd" else fns.backward) is not None
]


@pytest.mark.parametrize("case,direction,impl", PARAMS)
def test_neighborhood(benchmark, case, direction, impl):
    benchmark.group = f"{case.op} {direction} {case.shape}"
    benchmark.extra_info["gflop"] = case.flops_fwd * (case.bwd_factor if direction == "bwd" else 1) / 1e9
    fn = case.impls[impl].forward if direction == "fwd" else case.impls[impl].backward
    fn()  # warm-up outside the timing (builds the saved graph / compiles)
    benchmark(fn)
