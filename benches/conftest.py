"""pytest-benchmark setup: a fixed, recorded thread count for every implementation.

    .venv/bin/python -m pytest benches --benchmark-only [--benchmark-group-by=group]
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

THREADS = int(os.environ.get("FASTATTN_BENCH_THREADS", "2"))


@pytest.fixture(autouse=True)
def _fixed_threads(request, monkeypatch):
    torch.set_num_threads(THREADS)
    monkeypatch.setenv("FASTATTN_NUM_THREADS", str(THREADS))
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["threads"] = THREADS
