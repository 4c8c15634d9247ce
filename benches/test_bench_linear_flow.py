"""Linear attention and Flow-Attention vs their peers (fla's naive recurrence, the plain
PyTorch implementations, SDPA), forward and backward, one pytest-benchmark group per shape
and direction. Peers that would take minutes or tens of GB at a size are absent there (see
``benches/cases.py``)."""

import pytest

from cases import flow_cases, linear_cases

CASES = linear_cases(ts=(1024, 4096)) + flow_cases(ts=(1024, 4096))
PARAMS = [
    pytest.param(case, direction, impl, id=f"{case.op}-{case.shape.replace(' ', '-')}-{direction}-{impl}")
    for case in CASES
    for direction in ("fwd", "bwd")
    for impl, fns in case.impls.items()
    if (fns.forward if direction == "fwd" else fns.backward) is not None
]


@pytest.mark.parametrize("case,direction,impl", PARAMS)
def test_linear_flow(benchmark, case, direction, impl):
    benchmark.group = f"{case.op} {direction} {case.shape}"
    benchmark.extra_info["gflop"] = case.flops_fwd * (case.bwd_factor if direction == "bwd" else 1) / 1e9
    fn = case.impls[impl].forward if direction == "fwd" else case.impls[impl].backward
    fn()  # warm-up outside the timing (builds the saved graph for bwd)
    benchmark(fn)
