"""The main job's own machinery (benches/): the FMA peak it divides by, the interleaved
timing behind its ratios, its JSON output and --quick. No assertion here is about speed: the
callables timed are stand-ins that log their calls."""

import argparse
import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benches"))

import cases  # noqa: E402
import compare  # noqa: E402
import peak  # noqa: E402
import results  # noqa: E402
import table  # noqa: E402
import timing  # noqa: E402


def _measure(values):
    it = iter(values)
    calls = []

    def measure(threads):
        calls.append(threads)
        return next(it)

    return measure, calls


# --- the peak ------------------------------------------------------------------------------


def test_peak_keeps_the_highest_measurement():
    measure, calls = _measure([232.0, 117.0, 229.0, 225.0])
    p = peak.PeakTracker(2, measure)
    p.sample(4)
    assert p.best == 232.0
    assert p.agreeing() == 3  # 117 is a busy moment, not the machine
    assert calls == [2, 2, 2, 2]
    assert p.share(116.0) == pytest.approx(50.0)


def test_peak_refuses_a_share_above_100_percent():
    p = peak.PeakTracker(2, _measure([])[0])
    p.add(200.0)
    assert p.share(200.0) == pytest.approx(100.0)
    assert p.share(200.5) is None
    with pytest.raises(ValueError):
        p.add(0.0)
    with pytest.raises(ValueError):
        peak.PeakTracker(2, _measure([])[0]).best


def test_settle_remeasures_until_the_share_fits():
    measure, calls = _measure([150.0, 240.0, 999.0])
    p = peak.PeakTracker(2, measure)
    p.add(117.0)  # the start caught a bad moment
    assert p.settle(230.0) == pytest.approx(100 * 230 / 240)
    assert calls == [2, 2]  # stopped as soon as the share fitted
    assert p.settle(100.0) == pytest.approx(100 * 100 / 240)
    assert calls == [2, 2]  # a share that fits re-measures nothing


def test_settle_gives_up_after_its_tries():
    measure, calls = _measure([200.0] * 10)
    p = peak.PeakTracker(2, measure)
    p.add(200.0)
    assert p.settle(300.0, tries=3) is None
    assert len(calls) == 3


def test_describe_cross_checks_threads_times_single_thread():
    measure, _ = _measure([230.0, 117.0, 120.0, 115.0])
    p = peak.PeakTracker(2, measure)
    p.sample()
    p.sample_single()
    text = p.describe()
    assert "230.0 GFLOP/s" in text and "2 x single-thread 117.0 = 234.0" in text and "busy" not in text
    p.sample_single()
    assert p.single == 120.0  # the single-thread figure keeps its highest too
    low = peak.PeakTracker(2, _measure([150.0, 117.0])[0])
    low.sample()
    low.sample_single()
    assert "busy" in low.describe()  # 150 < 90% of 234


def test_start_of_run_measures_every_thread_then_one():
    measure, calls = _measure([230.0, 231.0, 229.0, 117.0])
    p = peak.start_of_run(2, measure)
    assert calls == [2] * peak.START_MEASUREMENTS + [1]
    assert p.best == 231.0 and p.single == 117.0


# --- interleaved timing ----------------------------------------------------------------------


def _runs(log):
    """The log compressed into (name, run length) blocks."""
    out = []
    for name in log:
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return out


def test_interleaving_alternates_and_runs_each_side_the_same_rounds():
    log = []
    fns = {"fastattn": lambda: log.append("a"), "peer": lambda: [log.append("b"), time.sleep(2e-4)]}
    res = timing.interleaved(fns, slice_s=2e-3, min_rounds=3, max_rounds=6, min_seconds=0.005)
    a, b = res["fastattn"], res["peer"]
    assert a.rounds == b.rounds >= 3
    blocks = _runs(log)
    # warm-up and first timed call of each side, in turn, then one block per side per round
    assert blocks[:2] == [["a", 2], ["b", 2]]
    rounds = blocks[2:]
    assert [n for n, _ in rounds] == ["a", "b"] * a.rounds
    assert all(k == a.calls_per_round for n, k in rounds if n == "a")
    assert all(k == b.calls_per_round for n, k in rounds if n == "b")
    assert a.calls_per_round > b.calls_per_round >= 1  # the faster side makes more calls a round
    assert a.best == min([a.best, *a.round_bests]) and b.best <= min(b.round_bests)


def test_a_very_slow_side_is_timed_once_and_sits_the_rounds_out():
    log = []
    fns = {"fastattn": lambda: log.append("a"), "slow": lambda: [log.append("s"), time.sleep(0.02)]}
    res = timing.interleaved(fns, slow=0.005, once_above=0.01, slice_s=1e-3, min_seconds=0.001)
    assert res["slow"].once and res["slow"].rounds == 0 and log.count("s") == 2
    assert res["slow"].best >= 0.02
    assert not res["fastattn"].once and res["fastattn"].rounds >= timing.MIN_ROUNDS
    assert timing.disagreement(res["fastattn"], res["slow"]) is None
    again = timing.interleaved(fns, slow=0.005, once_above=0.01, repeat_slow=True, slice_s=1e-3, min_rounds=2,
                               max_rounds=2, min_seconds=0.001)
    assert not again["slow"].once and again["slow"].rounds == again["fastattn"].rounds == 2


def test_a_slow_side_runs_one_call_in_each_of_the_slow_rounds():
    # One bad first call must not become the side's figure: the slow side is timed again in
    # alternating single-call rounds, and its best is the fastest of those calls.
    log, delays = [], iter([0.01, 0.05] + [0.012] * 10)
    fns = {"fastattn": lambda: log.append("a"), "slow": lambda: [log.append("s"), time.sleep(next(delays))]}
    res = timing.interleaved(fns, slow=0.005, once_above=1.0, slice_s=1e-3, min_seconds=0.001)
    s, a = res["slow"], res["fastattn"]
    assert not s.once and s.calls_per_round == 1
    assert s.rounds == a.rounds == timing.SLOW_ROUNDS
    assert log.count("s") == 2 + timing.SLOW_ROUNDS
    assert [n for n, _ in _runs(log)[2:]] == ["a", "s"] * timing.SLOW_ROUNDS
    assert 0.012 <= s.best < 0.05  # the slow first timed call (0.05 s) is not kept
    assert timing.disagreement(a, s) is not None


def test_a_failing_side_is_named():
    def boom():
        raise RuntimeError("no")

    with pytest.raises(timing.SideFailed) as e:
        timing.interleaved({"fastattn": lambda: None, "peer": boom})
    assert e.value.name == "peer" and isinstance(e.value.error, RuntimeError)


def test_disagreement_compares_the_halves_of_the_rounds():
    ours = timing.SideTiming(1.0, round_bests=[1.0, 1.2, 1.0, 1.1])
    steady = timing.SideTiming(2.0, round_bests=[2.0, 2.4, 2.0, 2.2])
    assert timing.disagreement(ours, steady) == pytest.approx(0.0)
    drift = timing.SideTiming(2.0, round_bests=[2.0, 2.0, 2.6, 2.6])  # the peer slowed down mid-way
    assert timing.disagreement(ours, drift) == pytest.approx(0.3)
    assert timing.disagreement(timing.SideTiming(1.0, round_bests=[1.0]), steady) is None


# --- a row, JSON and compare ---------------------------------------------------------------------


def _args(**kw):
    return argparse.Namespace(**{"full": False, "slow": 0.2, "once": 1.0, "budget": 3.0, **kw})


def _fake_case(calls):
    def f(name):
        return lambda: calls.append(name)

    def broken():
        raise ValueError("peer cannot run this")

    case = cases.Case("fake", "B1 T8", 1e6, 2.5)
    case.impls["fastattn"] = cases.Impl(f("ours"), f("ours_bwd"))
    case.impls["peer"] = cases.Impl(f("peer"), None, skip={"bwd": "no backward"})
    case.impls["broken"] = cases.Impl(broken)
    return case


def test_time_row_pairs_fastattn_with_each_peer(monkeypatch):
    monkeypatch.setattr(timing, "SLICE", 1e-4)
    calls = []
    case = _fake_case(calls)
    progress = timing.Progress(enabled=False)
    row = table.time_row(case, "fwd", _args(), table.Predictor(), progress)
    assert list(row["times"]) == ["fastattn", "peer"]
    assert row["skipped"] == {"broken": "failed: ValueError"}
    assert row["speedup"]["peer"] > 0 and "rounds" in row["method"]["peer"]
    bwd = table.time_row(case, "bwd", _args(), table.Predictor(), progress)
    assert list(bwd["times"]) == ["fastattn"] and bwd["skipped"] == {"peer": "no backward"}
    assert "ours_bwd" in calls


def test_json_round_trips_and_compares(tmp_path):
    matmul, p = 200.0, peak.PeakTracker(2, _measure([])[0])
    p.add(400.0)
    rows = []
    for t_ours in (1e-3, 2e-3):
        row = {"op": "attention", "shape": f"T{int(t_ours * 1e6)}", "dir": "fwd", "flops": 2e8,
               "times": {"fastattn": t_ours, "sdpa": 3 * t_ours}, "speedup": {"sdpa": 3.0}, "spread": {"sdpa": 0.2},
               "method": {"fastattn": "best of 10 rounds x 9 calls", "sdpa": "one call after warm-up"},
               "skipped": {"natten": "no CPU backward"}}
        table.add_rates(row, matmul, p)
        rows.append(row)
    assert rows[0]["pct_peak"] == pytest.approx(50.0) and rows[0]["pct_mm"] == pytest.approx(100.0)
    machine = {"cpu": "test", "threads": 2, **p.facts(), "matmul_gflops": matmul}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    results.save(str(a), machine, rows)
    assert results.load(str(a)) == (machine, rows)
    faster = json.loads(json.dumps(rows))
    faster[0]["times"]["fastattn"] /= 2
    faster[0]["speedup"]["sdpa"] = 6.0
    results.save(str(b), machine, faster[:1])
    lines = compare.compare(str(a), str(b))
    assert any("B/A  0.50" in line and "sdpa 3.00x~ -> 6.00x~" in line for line in lines)
    assert any("T2000" in line and "not in B" in line for line in lines)
    text = table.format_row(rows[0])
    assert "1.00 ms" in text and "3.00x~)" in text and "50.0% peak" in text and "natten (no CPU backward)" in text
    (tmp_path / "c.json").write_text('{"rows": []}')
    with pytest.raises(ValueError):
        results.load(str(tmp_path / "c.json"))


def test_a_row_above_the_peak_is_printed_as_an_error():
    p = peak.PeakTracker(2, lambda threads: 100.0)  # re-measuring cannot save it
    p.add(100.0)
    row = {"op": "x", "shape": "s", "dir": "fwd", "flops": 1e9, "times": {"fastattn": 1e-3}, "speedup": {},
           "spread": {}, "method": {}, "skipped": {}}
    table.add_rates(row, 100.0, p)  # 1000 GFLOP/s against a 100 GFLOP/s peak
    assert row["peak_error"] and row["pct_peak"] is None
    text = table.format_row(row)
    assert ">100%! peak" in text and "1000.0% peak" not in text


# --- --quick -------------------------------------------------------------------------------------


def test_quick_covers_every_family_with_smaller_shapes():
    assert set(cases.QUICK) == set(cases.ALL_FAMILIES) and set(cases.FAMILIES) <= set(cases.ALL_FAMILIES)
    for fam, build in cases.ALL_FAMILIES.items():
        quick = build(**cases.QUICK[fam])
        full = build()
        assert quick, fam
        assert max(c.flops_fwd for c in quick) <= max(c.flops_fwd for c in full) / 4, fam
        assert sum(c.flops_fwd for c in quick) <= sum(c.flops_fwd for c in full) / 4, fam
        for c in quick + full:
            c.impls.clear()
