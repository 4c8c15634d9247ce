"""fastattn in the processes and threads users run it in: forked children (plain ``os.fork``,
a fork-context ``multiprocessing.Pool``, ``DataLoader`` workers), a fork while another
thread is inside a kernel, many Python threads at once, and many calls in a row.

Every child is waited for with a deadline, so a hang fails the test instead of the run.

torch's own OpenMP pool does not survive a fork: a child's first parallel torch op (a large
``exp`` or ``clone``) hangs once the parent has used it. DataLoader workers avoid that with
``torch.set_num_threads(1)``; every child here does the same (:func:`_child_setup`) and sets
``FASTATTN_NUM_THREADS=2``, so fastattn's calls in the child still go through its own pool.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import numpy as np
import pytest
import torch

import fastattn

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

DEADLINE = 120.0  # seconds a child may take; a working one needs well under one


def _inputs(seed: int = 0) -> dict[str, tuple]:
    """One call per family, each large enough to run on the thread pool (not inline)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "attention": (r(1, 256, 4, 32), r(1, 256, 4, 32), r(1, 256, 4, 32)),
        "na2d": (r(1, 24, 24, 4, 32), r(1, 24, 24, 4, 32), r(1, 24, 24, 4, 32)),
        "linear": (r(1, 512, 4, 32).sigmoid(), r(1, 512, 4, 32).sigmoid(), r(1, 512, 4, 32)),
        "flow": (r(1, 512, 4, 32), r(1, 512, 4, 32), r(1, 512, 4, 32)),
        "hilo": (r(1, 24, 23, 3 * 64), r(1, 24, 23, 64), r(1, 12, 12, 128), r(128)),
    }


def _call(name: str, args) -> torch.Tensor:
    if name == "attention":
        return fastattn.attention(*args, is_causal=True)
    if name == "na2d":
        return fastattn.na2d(*args, kernel_size=5, dilation=2)
    if name == "linear":
        return fastattn.linear_attention(*args)[0]
    if name == "hilo":
        hi, lo = fastattn.hilo_attention(*args[:3], window_size=2, head_dim=32, hi_pad_kv=args[3])
        return torch.cat([hi, lo], -1)
    return fastattn.flow_attention(*args, causal=True)


def _call_with_grads(name: str, args) -> list[torch.Tensor]:
    xs = [a.detach().clone().requires_grad_(True) for a in args]
    out = _call(name, xs)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [x.grad for x in xs]


def _all_results(seed: int = 0) -> dict[str, list[torch.Tensor]]:
    return {name: _call_with_grads(name, args) for name, args in _inputs(seed).items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a
    )


def _child_setup(*_):
    torch.set_num_threads(1)
    os.environ["FASTATTN_NUM_THREADS"] = "2"


def _wait(pid: int) -> int:
    """The child's exit code; kills it and fails if it outlives the deadline."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} hung for {DEADLINE:.0f} s")


def _fork_and_check(want: dict) -> None:
    """Forks; the child recomputes every family (forward and backward) and exits 0 only if
    it matches the parent bit for bit."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            _child_setup()
            code = 0 if _same(_all_results(), want) else 3
        finally:
            os._exit(code)
    assert _wait(pid) == 0, "the forked child's results differ from the parent's"


def test_plain_fork_after_pool_use_gives_parent_results():
    want = _all_results()  # starts the pool in the parent
    _fork_and_check(want)
    # and the parent's own pool still works after the fork
    assert _same(_all_results(), want)


def test_fork_of_a_fork():
    want = _all_results()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _child_setup()
            _all_results()  # the child's own pool, then a grandchild
            inner = os.fork()
            if inner == 0:
                os._exit(0 if _same(_all_results(), want) else 3)
            end = time.monotonic() + DEADLINE
            while time.monotonic() < end:
                done, status = os.waitpid(inner, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.02)
            else:
                os.kill(inner, 9)
                code = 4
        finally:
            os._exit(code)
    assert _wait(pid) == 0


def test_fork_while_another_thread_is_inside_a_kernel():
    """The fork lands while a second thread runs kernels (so the pool's workers are busy and
    its locks may be taken); the child's first call still works and matches."""
    want = _all_results()
    big = tuple(torch.randn(1, 1024, 8, 64) for _ in range(3))
    stop = threading.Event()
    inside = threading.Event()
    calls = [0]

    def busy():
        while not stop.is_set():
            inside.set()
            fastattn.attention(*big)
            calls[0] += 1

    t = threading.Thread(target=busy)
    t.start()
    try:
        inside.wait(10)
        for _ in range(4):
            time.sleep(0.013)  # not a multiple of one call's time: lands at different points
            _fork_and_check(want)
    finally:
        stop.set()
        t.join()
    assert calls[0] > 0


def _pool_task(seed: int) -> list[np.ndarray]:
    return [t.numpy() for t in _all_results(seed)["attention"] + _all_results(seed)["na2d"]]


def test_fork_context_multiprocessing_pool():
    want = [_pool_task(s) for s in (1, 2, 3)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2, initializer=_child_setup) as pool:
        got = pool.map_async(_pool_task, [1, 2, 3]).get(timeout=DEADLINE)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)


class _AttendDataset(torch.utils.data.Dataset):
    """Each item is computed by fastattn ops in the worker, as a preprocessing step would."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(1, 16, 16, 4, 32, generator=g)
        y = fastattn.na2d(x, x, x, kernel_size=3)
        q = torch.randn(1, 300, 4, 32, generator=g)
        return y[0], fastattn.attention(q, q, q, is_causal=True)[0]


def test_dataloader_workers_run_fastattn_ops():
    ds = _AttendDataset()
    _all_results()  # the parent has used the pool before forking its workers
    want = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, timeout=DEADLINE,
                                         multiprocessing_context="fork", worker_init_fn=_child_setup)
    got = [item for batch in loader for item in zip(*batch)]
    assert len(got) == len(want)
    for (g1, g2), (w1, w2) in zip(got, want):
        assert torch.equal(g1, w1) and torch.equal(g2, w2)


def test_eight_python_threads_give_bit_identical_results():
    """Eight threads call every family at once, each several times, with different inputs:
    each result equals the same call made alone."""
    seeds = list(range(8))
    want = {s: _all_results(s) for s in seeds}
    got: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(seeds))

    def work(seed):
        try:
            barrier.wait()
            got[seed] = [_all_results(seed) for _ in range(3)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for s in seeds:
        for result in got[s]:
            assert _same(result, want[s]), f"thread {s} differs"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_ten_thousand_calls_do_not_grow_memory():
    """After a warm-up (which fills the scratch pool), 10,000 more calls over every family
    and direction leave the resident set where it was, up to allocator noise."""
    small = {
        "attention": tuple(torch.randn(1, 16, 2, 16) for _ in range(3)),
        "na2d": tuple(torch.randn(1, 10, 10, 2, 16) for _ in range(3)),
        "linear": (torch.rand(1, 32, 2, 16), torch.rand(1, 32, 2, 16), torch.randn(1, 32, 2, 16)),
        "flow": tuple(torch.randn(1, 32, 2, 16) for _ in range(3)),
    }
    larger = _inputs()

    def calls(n):
        for i in range(n):
            name = ("attention", "na2d", "linear", "flow")[i % 4]
            if i % 2:
                _call_with_grads(name, small[name])
            else:
                _call(name, small[name])
            if i % 500 == 0:  # pooled scratch, reused
                _call_with_grads(name, larger[name])

    calls(2000)
    before = _rss_bytes()
    calls(10_000)
    grown = _rss_bytes() - before
    assert grown < 4 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 10,000 calls"
