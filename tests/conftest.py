import os

import pytest
import torch

import fastattn


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FASTATTN_EXTENDED") == "1":
        return
    skip = pytest.mark.skip(reason="extended sweep: set FASTATTN_EXTENDED=1")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=fastattn.simd_levels())
def simd_level(request):
    """Runs a test once per SIMD level this CPU has, restoring the best level after."""
    fastattn.set_simd_level(request.param)
    try:
        yield request.param
    finally:
        fastattn.set_simd_level(None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _compiled_matches_eager(f, args, backend):
    """``torch.compile(f, fullgraph=True)`` gives the eager value and gradients (a graph
    break would raise under fullgraph)."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(*args)
    got.backward()
    grads = [x.grad.clone() for x in args]
    for x in args:
        x.grad = None
    want = f(*args)
    want.backward()
    torch.testing.assert_close(got, want)
    for g, x in zip(grads, args):
        torch.testing.assert_close(g, x.grad)


@pytest.fixture
def compiled_matches_eager():
    return _compiled_matches_eager
