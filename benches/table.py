"""The main job: time fastattn's ops against their peers on this CPU and print a table.

Columns: op, shape, direction, fastattn's time, its effective GFLOP/s, its share of this
machine's fp32 matmul rate through torch (``% mm``) and of the fp32 FMA peak measured in the
same run (``% peak``, the hardware limit), then each peer's time and fastattn's speedup over
it, or why the peer has no figure in that cell.

The default run respects the reader's time (a few minutes on 2 cores): a call that takes
longer than ``--slow`` seconds is timed once after its warm-up instead of repeatedly, and a
peer call predicted (from its time on a smaller case of the same family) to exceed
``--budget`` seconds is skipped with the prediction printed. ``--full`` times every call
best-of-N and skips nothing but what would not fit in memory.

    ./scripts/bench.sh                    # defaults: 2 threads, every family, default shapes
    ./scripts/bench.sh --full             # exhaustive: no budget, every call repeated
    ./scripts/bench.sh --quick            # small shapes only
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
from cases import FAMILIES  # noqa: E402
from timing import Progress, time_call, matmul_gflops  # noqa: E402


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


def run(args) -> list[dict]:
    rows = []
    predictor = Predictor()
    progress = Progress(enabled=sys.stdout.isatty())
    families = args.family or list(FAMILIES)
    for fam in families:
        kwargs = {"ts": (512,)} if args.quick and fam == "attention" else {}
        for case in FAMILIES[fam](**kwargs):
            for direction in ("fwd", "bwd"):
                times, skipped = {}, {}
                for name, impl in case.impls.items():
                    fn = impl.forward if direction == "fwd" else impl.backward
                    if fn is None:
                        if direction in impl.skip:
                            skipped[name] = impl.skip[direction]
                        continue
                    cost = case.flops_fwd if impl.cost is None else impl.cost
                    key = (case.series or case.op, name, direction)
                    guess = None if args.full or name == "fastattn" else predictor.predict(key, cost)
                    if guess is not None and guess[0] > args.budget:
                        skipped[name] = f"est. {guess[0]:.1f} s/call > {args.budget:g} s budget (from {guess[1]})"
                    else:
                        progress.show(f"{case.op} {case.shape} {direction}: {name}")
                        try:
                            times[name] = time_call(fn, repeat_slow=args.full, slow=args.slow)
                            predictor.record(key, cost, times[name], case.shape)
                        except Exception as e:  # a peer that cannot run this case
                            skipped[name] = f"failed: {type(e).__name__}"
                            progress.clear()
                            print(f"  {name} {case.shape} {direction}: {type(e).__name__}: {e}", file=sys.stderr)
                    if direction == "bwd":
                        # its saved forward graph can be gigabytes: one peer's at a time
                        impl.backward = fn = None
                        gc.collect()
                progress.clear()
                if "fastattn" not in times:
                    continue
                flops = case.flops_fwd * (case.bwd_factor if direction == "bwd" else 1.0)
                label = direction if direction == "fwd" else case.bwd_label
                rows.append({"op": case.op, "shape": case.shape, "dir": label, "times": times,
                             "skipped": skipped, "flops": flops})
                _print_row(rows[-1], args.matmul, args.peak)
            # Release the case's inputs, saved graphs, masks and compiled kernels before the
            # next one: peers' [N, N] score graphs add up to more than this machine holds.
            case.impls.clear()
            gc.collect()
    return rows


def _print_row(row, matmul, peak):
    ours = row["times"]["fastattn"]
    gflops = row["flops"] / ours / 1e9
    cells = [f"{name} {_fmt_ms(t)} ms ({t / ours:5.2f}x)" for name, t in row["times"].items() if name != "fastattn"]
    cells += [f"{name} ({why})" for name, why in row.get("skipped", {}).items()]
    print(
        f"{row['op']:<12} {row['shape']:<28} {row['dir']:<4} fastattn {_fmt_ms(ours)} ms  "
        f"{gflops:7.1f} GFLOP/s {100 * gflops / matmul:5.1f}% mm {100 * gflops / peak:5.1f}% peak  |  "
        + "  ".join(cells),
        flush=True,
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, peers, speed = [], sorted({p for r in rows for p in r["times"] if p != "fastattn"}), {}
    for r in rows:
        labels.append(f"{r['op']} {r['shape']} {r['dir']}")
        for p in peers:
            t = r["times"].get(p)
            speed.setdefault(p, []).append(t / r["times"]["fastattn"] if t else 0.0)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="threads for torch and fastattn (default 2)")
    p.add_argument("--family", action="append", choices=list(FAMILIES), help="limit to a family (repeatable)")
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--full", action="store_true",
                   help="exhaustive run: every call best-of-N, no time budget (takes several times longer)")
    p.add_argument("--budget", type=float, default=3.0, metavar="S",
                   help="skip a peer's call predicted to take more than S seconds (default 3; not with --full)")
    p.add_argument("--slow", type=float, default=0.2, metavar="S",
                   help="time calls slower than S seconds once after warm-up (default 0.2; not with --full)")
    p.add_argument("--plot", metavar="PNG", help="also write a speedup plot")
    # Internal: one family per child process (see below).
    p.add_argument("--child-rates", help=argparse.SUPPRESS)
    p.add_argument("--child-rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _quiet_libraries()

    torch.set_num_threads(args.threads)
    os.environ["FASTATTN_NUM_THREADS"] = str(args.threads)
    torch.manual_seed(0)
    if args.child_rows:
        args.matmul, args.peak = map(float, args.child_rates.split(","))
        with open(args.child_rows, "w") as f:
            json.dump(run(args), f)
        return
    start = time.perf_counter()
    print(
        f"fastattn {fastattn.__version__} | torch {torch.__version__} | {_cpu_name()} | "
        f"threads {args.threads} (fastattn {fastattn.num_threads()}, torch {torch.get_num_threads()}) | "
        f"SIMD {fastattn.simd_level()} | fp32 | {'full run' if args.full else f'budget {args.budget:g} s/call'}"
    )
    args.matmul = matmul_gflops()
    args.peak = fastattn.measure_fma_peak(args.threads)
    print(f"fp32 matmul rate (torch.mm 2048^3, same run): {args.matmul:.1f} GFLOP/s")
    print(f"fp32 FMA peak (same run): {args.peak:.1f} GFLOP/s = {args.threads} threads x "
          f"{fastattn.simd_level()} vector FMA chains, independent, best of 5 (see docs/benchmarks.md)")
    timing = "best-of-N wall clock" + ("" if args.full else f" (one call after warm-up for calls over {args.slow:g} s)")
    print(f"times are {timing}; speedup = peer time / fastattn time\n", flush=True)
    # Each family runs in its own process: peers' multi-GB score matrices leave the heap
    # fragmented, and a later family's peers then run out of memory.
    rows = []
    for fam in args.family or list(FAMILIES):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, os.path.abspath(__file__), "--family", fam, "--threads", str(args.threads),
                   "--budget", str(args.budget), "--slow", str(args.slow),
                   "--child-rates", f"{args.matmul},{args.peak}", "--child-rows", out.name]
            cmd += ["--quick"] * args.quick + ["--full"] * args.full
            if subprocess.run(cmd).returncode != 0:
                print(f"  family {fam}: benchmark process failed", file=sys.stderr)
                continue
            rows += json.load(open(out.name))
    if args.plot:
        plot(rows, args.plot)
    print()
    overhead.report()
    print(f"\ntable done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
