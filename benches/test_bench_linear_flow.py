"""Linear attention and Flow-Attention vs their peers (fla's naive recurrence, the plain
PyTorch implementations, SDPA), forward and backward, one pytest-benchmark group per shape
and direction. Peers that would take minutes or tens of GB at a size are absent there (see
``benches/cases.py``)."""

import pytest

from cases import bench_params, flow_cases, linear_cases, run_bench

CASES = linear_cases(ts=(1024, 4096)) + flow_cases(ts=(1024, 4096))
PARAMS = bench_params(CASES)


@pytest.mark.parametrize("case,direction,impl", PARAMS)
def test_linear_flow(benchmark, case, direction, impl):
    run_bench(benchmark, case, direction, impl)
