"""Landmark attention's training form vs the eager grouped softmax, fastattn's causal
attention and causal SDPA, forward and backward, one pytest-benchmark group per shape and
direction."""

import pytest

from cases import bench_params, landmark_cases, run_bench

CASES = landmark_cases(ts=(2048,))
PARAMS = bench_params(CASES)


@pytest.mark.parametrize("case,direction,impl", PARAMS)
def test_landmark(benchmark, case, direction, impl):
    run_bench(benchmark, case, direction, impl)
