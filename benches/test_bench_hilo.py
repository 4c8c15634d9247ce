"""LITv2's HiLo layer vs the layer as LITv2 writes it and the projection floor (its Linear
layers alone), forward in inference mode and forward+backward, one pytest-benchmark group per
shape and direction ("bwd" here is the whole training step)."""

import pytest

from cases import HILO_SHAPES, bench_params, hilo_cases, run_bench

CASES = hilo_cases(HILO_SHAPES[1:])
PARAMS = bench_params(CASES)


@pytest.mark.parametrize("case,direction,impl", PARAMS)
def test_hilo(benchmark, case, direction, impl):
    run_bench(benchmark, case, direction, impl)
