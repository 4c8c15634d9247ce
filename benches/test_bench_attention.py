"""Dense attention vs torch SDPA, forward and backward, one pytest-benchmark group per
shape and direction so each comparison sits in its own table."""

import pytest

from cases import attention_cases

CASES = attention_cases(ts=(512, 2048))


@pytest.mark.parametrize("impl", ["fastattn", "torch_sdpa"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("case", CASES, ids=[c.shape.replace(" ", "-") for c in CASES])
def test_attention(benchmark, case, direction, impl):
    benchmark.group = f"attention {direction} {case.shape}"
    benchmark.extra_info["gflop"] = case.flops_fwd * (case.bwd_factor if direction == "bwd" else 1) / 1e9
    fn = case.impls[impl].forward if direction == "fwd" else case.impls[impl].backward
    fn()  # warm-up outside the timing (builds the saved graph for bwd)
    benchmark(fn)
