"""Neighborhood attention vs natten (CPU forward), compiled flex attention with a block
mask, SDPA with a boolean mask and the plain reference, forward and backward, one
pytest-benchmark group per shape and direction. The largest shapes live in the main-job
table (``./scripts/bench.sh --family neighborhood``)."""

import pytest

from cases import bench_params, neighborhood_cases, run_bench

CASES = neighborhood_cases(shapes=[
    (1, (1024,), 4, 64, 63, 1),
    (1, (28, 28), 4, 32, 7, 1),
    (1, (8, 8, 8), 4, 64, 3, 1),
])
PARAMS = bench_params(CASES)


@pytest.mark.parametrize("case,direction,impl", PARAMS)
def test_neighborhood(benchmark, case, direction, impl):
    run_bench(benchmark, case, direction, impl)
