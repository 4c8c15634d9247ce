"""The main job: time fastattn's ops against their peers on this CPU and print a table.

Columns: op, shape, direction, fastattn's time, its effective GFLOP/s, its share of this
machine's fp32 matmul rate through torch (``% mm``) and of the fp32 FMA peak measured in the
same run (``% peak``, the hardware limit: the highest of several measurements spread over the
run), then each peer's time and fastattn's speedup over it, or why the peer has no figure in
that cell. fastattn and each peer are timed in alternating rounds, so a noisy spell lands on
both sides of a ratio; ``~`` marks a ratio whose rounds disagree by more than 15%.

The default run respects the reader's time (a few minutes on 2 cores): a call that takes
longer than ``--slow`` seconds is timed three times (its first call and one in each of two
alternating rounds), one longer than ``--once`` seconds once after its warm-up, and a
peer call predicted (from its time on a smaller case of the same family) to exceed
``--budget`` seconds is skipped with the prediction printed. ``--full`` times every call
best-of-N and skips nothing but what would not fit in memory.

    ./scripts/bench.sh                    # defaults: 2 threads, every family, default shapes
    ./scripts/bench.sh --full             # exhaustive: no budget, every call repeated
    ./scripts/bench.sh --quick            # every family's small shapes: under a minute
    ./scripts/bench.sh --json run.json    # also every row as JSON; benches/compare.py A B
    ./scripts/bench.sh --family attention --threads 1 --plot speedups.png
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fastattn  # noqa: E402
import overhead  # noqa: E402
import results  # noqa: E402
from cases import ALL_FAMILIES, FAMILIES, QUICK  # noqa: E402
from peak import REMEASURE_TRIES, PeakTracker, start_of_run  # noqa: E402
from timing import DISAGREE, Progress, SideFailed, SideTiming, disagreement, interleaved, matmul_gflops  # noqa: E402


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:9.2f}"


class Predictor:
    """A call's expected time from the same implementation's last measured call in the same
    direction, scaled by the ratio of the implementations' declared work."""

    def __init__(self):
        # (series, implementation, direction) -> (cost, seconds, shape) of the last call
        self.seen: dict[tuple, tuple[float, float, str]] = {}

    def record(self, key: tuple, cost: float, seconds: float, shape: str) -> None:
        self.seen[key] = (cost, seconds, shape)

    def predict(self, key: tuple, cost: float) -> tuple[float, str] | None:
        prev = self.seen.get(key)
        if prev is None or prev[0] <= 0:
            return None
        return prev[1] * cost / prev[0], prev[2]


def _method(t: SideTiming) -> str:
    return "one call after warm-up" if t.once else f"best of {t.rounds} rounds x {t.calls_per_round} calls"


def time_row(case, direction: str, args, predictor: Predictor, progress: Progress) -> dict | None:
    """One row: fastattn timed against each peer in turn, in alternating rounds (its figure is
    its best over every pair; each speedup comes from its own pair's rounds). None when
    fastattn has no such direction or fails."""
    ours = case.impls["fastattn"].forward if direction == "fwd" else case.impls["fastattn"].backward
    if ours is None:
        return None
    times, skipped, ratios, spread, method = {}, {}, {}, {}, {}
    ours_runs: list[SideTiming] = []
    ours_once = None  # fastattn slower than --once: timed once, reused for the later pairs
    for name, impl in case.impls.items():
        if name == "fastattn":
            continue
        fn = impl.forward if direction == "fwd" else impl.backward
        if fn is None:
            if direction in impl.skip:
                skipped[name] = impl.skip[direction]
            continue
        cost = case.flops_fwd if impl.cost is None else impl.cost
        key = (case.series or case.op, name, direction)
        guess = None if args.full else predictor.predict(key, cost)
        if guess is not None and guess[0] > args.budget:
            skipped[name] = f"est. {guess[0]:.1f} s/call > {args.budget:g} s budget (from {guess[1]})"
            continue
        progress.show(f"{case.op} {case.shape} {direction}: fastattn vs {name}")
        sides = {name: fn} if ours_once else {"fastattn": ours, name: fn}
        try:
            res = interleaved(sides, slow=args.slow, repeat_slow=args.full, once_above=args.once)
        except SideFailed as e:
            progress.clear()
            print(f"  {e.name} {case.shape} {direction}: {e}", file=sys.stderr)
            if e.name == "fastattn":
                return None
            skipped[name] = f"failed: {type(e.error).__name__}"
            continue
        finally:
            if direction == "bwd":
                # its saved forward graph can be gigabytes: one peer's at a time
                impl.backward = fn = None
                gc.collect()
        mine = ours_once or res["fastattn"]
        if mine.once:
            ours_once = mine
        ours_runs.append(mine)
        peer = res[name]
        times[name], ratios[name] = peer.best, peer.best / mine.best
        spread[name], method[name] = disagreement(mine, peer), _method(peer)
        predictor.record(key, cost, peer.best, case.shape)
    if not ours_runs:  # no peer ran: fastattn alone
        progress.show(f"{case.op} {case.shape} {direction}: fastattn")
        try:
            ours_runs.append(interleaved({"fastattn": ours}, slow=args.slow, repeat_slow=args.full,
                                        once_above=args.once)["fastattn"])
        except SideFailed as e:
            progress.clear()
            print(f"  fastattn {case.shape} {direction}: {e}", file=sys.stderr)
            return None
    progress.clear()
    best = min(ours_runs, key=lambda t: t.best)
    return {
        "op": case.op, "shape": case.shape, "dir": direction if direction == "fwd" else case.bwd_label,
        "flops": case.flops_fwd * (case.bwd_factor if direction == "bwd" else 1.0),
        "times": {"fastattn": best.best, **times}, "speedup": ratios, "spread": spread,
        "method": {"fastattn": _method(best), **method}, "skipped": skipped,
    }


def run(args) -> list[dict]:
    """Times one process's families; rows carry times and FLOPs, the parent adds the rates."""
    rows = []
    predictor = Predictor()
    progress = Progress(enabled=sys.stdout.isatty())
    for fam in args.family or list(FAMILIES):
        for case in ALL_FAMILIES[fam](**(QUICK[fam] if args.quick else {})):
            for direction in ("fwd", "bwd"):
                row = time_row(case, direction, args, predictor, progress)
                if row is not None:
                    rows.append(row)
            # Release the case's inputs, saved graphs, masks and compiled kernels before the
            # next one: peers' [N, N] score graphs add up to more than this machine holds.
            case.impls.clear()
            gc.collect()
    return rows


def add_rates(row: dict, matmul: float, peak: PeakTracker) -> None:
    """fastattn's GFLOP/s and its shares of the matmul rate and the FMA peak; a share above
    100% of the peak re-measures the peak first and, if it still passes, is recorded as None
    with ``peak_error`` set."""
    gflops = row["flops"] / row["times"]["fastattn"] / 1e9
    row["gflops"], row["pct_mm"] = gflops, 100 * gflops / matmul
    row["pct_peak"] = peak.settle(gflops)
    row["peak_error"] = row["pct_peak"] is None


def format_row(row: dict) -> str:
    ours = row["times"]["fastattn"]
    pct = "  >100%!" if row["peak_error"] else f"{row['pct_peak']:7.1f}%"
    cells = []
    for name, t in row["times"].items():
        if name == "fastattn":
            continue
        spread = row["spread"].get(name)
        mark = "~" if spread is not None and spread > DISAGREE else ""
        cells.append(f"{name} {_fmt_ms(t)} ms ({row['speedup'][name]:5.2f}x{mark})")
    cells += [f"{name} ({why})" for name, why in row.get("skipped", {}).items()]
    return (f"{row['op']:<12} {row['shape']:<28} {row['dir']:<4} fastattn {_fmt_ms(ours)} ms  "
            f"{row['gflops']:7.1f} GFLOP/s {row['pct_mm']:5.1f}% mm {pct} peak  |  " + "  ".join(cells))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, peers, speed = [], sorted({p for r in rows for p in r["times"] if p != "fastattn"}), {}
    for r in rows:
        labels.append(f"{r['op']} {r['shape']} {r['dir']}")
        for p in peers:
            speed.setdefault(p, []).append(r["speedup"].get(p, 0.0))
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.5))
    width = 0.8 / max(1, len(peers))
    for i, p in enumerate(peers):
        ax.barh([y + i * width for y in range(len(labels))], speed[p], height=width, label=f"vs {p}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([y + 0.4 - width / 2 for y in range(len(labels))], labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("fastattn speedup (peer time / fastattn time)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def _quiet_libraries() -> None:
    """The peers warn on every call (natten's eager flex attention, flex's deprecations,
    fla's missing Triton): the table is not the place for it."""
    warnings.simplefilter("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the child processes too


def _child(args, fam: str, out: str) -> bool:
    cmd = [sys.executable, os.path.abspath(__file__), "--family", fam, "--threads", str(args.threads),
           "--budget", str(args.budget), "--slow", str(args.slow), "--once", str(args.once),
           "--child-rows", out]
    cmd += ["--quick"] * args.quick + ["--full"] * args.full
    return subprocess.run(cmd).returncode == 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="threads for torch and fastattn (default 2)")
    p.add_argument("--family", action="append", choices=list(ALL_FAMILIES),
                   help=f"limit to a family (repeatable); opt-in, not in the default run: {', '.join(sorted(set(ALL_FAMILIES) - set(FAMILIES)))}")
    p.add_argument("--quick", action="store_true", help="every family's small shapes only (under a minute)")
    p.add_argument("--full", action="store_true",
                   help="exhaustive run: every call best-of-N, no time budget (takes several times longer)")
    p.add_argument("--budget", type=float, default=3.0, metavar="S",
                   help="skip a peer's call predicted to take more than S seconds (default 3; not with --full)")
    p.add_argument("--slow", type=float, default=0.2, metavar="S",
                   help="time calls slower than S seconds three times, in two alternating rounds after the "
                        "first (default 0.2; not with --full)")
    p.add_argument("--once", type=float, default=1.0, metavar="S",
                   help="time calls slower than S seconds once after warm-up (default 1; not with --full)")
    p.add_argument("--plot", metavar="PNG", help="also write a speedup plot")
    p.add_argument("--json", metavar="PATH",
                   help="also write every row and the machine facts as JSON (compare runs: benches/compare.py)")
    # Internal: one family per child process (see below).
    p.add_argument("--child-rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _quiet_libraries()

    torch.set_num_threads(args.threads)
    os.environ["FASTATTN_NUM_THREADS"] = str(args.threads)
    torch.manual_seed(0)
    if args.child_rows:
        with open(args.child_rows, "w") as f:
            json.dump(run(args), f)
        return
    start = time.perf_counter()
    facts = {
        "fastattn": fastattn.__version__, "torch": torch.__version__, "cpu": _cpu_name(),
        "threads": args.threads, "fastattn_threads": fastattn.num_threads(), "torch_threads": torch.get_num_threads(),
        "simd": fastattn.simd_level(), "dtype": "fp32", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": "full" if args.full else f"budget {args.budget:g} s/call, slow {args.slow:g} s, once {args.once:g} s",
        "quick": args.quick, "families": args.family or list(FAMILIES),
    }
    print(f"fastattn {facts['fastattn']} | torch {facts['torch']} | {facts['cpu']} | threads {args.threads} "
          f"(fastattn {facts['fastattn_threads']}, torch {facts['torch_threads']}) | SIMD {facts['simd']} | fp32 | "
          f"{'full run' if args.full else f'budget {args.budget:g} s/call'}{' | quick' * args.quick}", flush=True)
    # Both reference rates are measured at the start and the end (the peak between families
    # too) and the highest kept: one measurement can catch a busy moment (benches/peak.py).
    matmul = [matmul_gflops()]
    peak = start_of_run(args.threads)
    # Each family runs in its own process: peers' multi-GB score matrices leave the heap
    # fragmented, and a later family's peers then run out of memory. Rows are printed once
    # every family has run, against the peak of the whole run.
    rows = []
    families = args.family or list(FAMILIES)
    for i, fam in enumerate(families):
        t0 = time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            if not _child(args, fam, out.name):
                print(f"  family {fam}: benchmark process failed", file=sys.stderr)
                continue
            got = json.load(open(out.name))
        rows += got
        if i + 1 < len(families):
            peak.sample()
        print(f"  {fam}: {len(got)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    peak.sample()
    peak.sample_single()
    matmul.append(matmul_gflops())
    facts["matmul_gflops"] = max(matmul)
    for row in rows:
        add_rates(row, facts["matmul_gflops"], peak)
    facts.update(peak.facts())

    print(f"\nfp32 matmul rate (torch.mm 2048^3, start and end of the run, higher kept): "
          f"{facts['matmul_gflops']:.1f} GFLOP/s")
    print(f"fp32 FMA peak ({facts['simd']} vector FMA chains, see docs/benchmarks.md): {peak.describe()}")
    timing = ("best-of-N wall clock" if args.full else
              f"best-of-N wall clock in alternating rounds (best of 3 calls for calls over {args.slow:g} s, "
              f"one call after warm-up over {args.once:g} s)")
    print(f"times are {timing}; speedup = peer time / fastattn time in the same rounds, "
          f"~ where those rounds disagree by more than {DISAGREE:.0%}\n")
    for row in rows:
        print(format_row(row))
    if any(r["peak_error"] for r in rows):
        print(f"\n>100%!: above the FMA peak even after re-measuring it {REMEASURE_TRIES} times: the row's "
              "time or FLOP count is wrong, not a share; rerun it")
    if args.plot:
        plot(rows, args.plot)
    print()
    overhead.report()
    facts["seconds"] = time.perf_counter() - start
    print(f"\ntable done in {facts['seconds']:.0f} s")
    if args.json:
        results.save(args.json, facts, rows)
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
