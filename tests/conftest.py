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
