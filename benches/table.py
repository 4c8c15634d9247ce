"""The main job: time fastattn's ops against their peers on this CPU and print a table.

Columns: op, shape, direction, fastattn time, each peer's time and fastattn's speedup over
it, fastattn's effective GFLOP/s and its share of this machine's fp32 matmul rate measured
in the same run. ``--plot out.png`` also draws the speedups.

    ./scripts/bench.sh                    # defaults: 2 threads, every family, default shapes
    ./scripts/bench.sh --quick            # small shapes only
    ./scripts/bench.sh --family attention --threads 1 --plot speedups.png
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import tempfile
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fastattn  # noqa: E402
from cases import FAMILIES  # noqa: E402
from timing import best_time, matmul_gflops  # noqa: E402


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


def run(args) -> list[dict]:
    rows = []
    families = args.family or list(FAMILIES)
    for fam in families:
        kwargs = {"ts": (512,)} if args.quick and fam == "attention" else {}
        for case in FAMILIES[fam](**kwargs):
            for direction in ("fwd", "bwd"):
                times = {}
                for name, impl in case.impls.items():
                    fn = impl.forward if direction == "fwd" else impl.backward
                    if fn is None:
                        continue
                    try:
                        times[name] = best_time(fn)
                    except Exception as e:  # a peer that cannot run this case
                        print(f"  {name} {case.shape} {direction}: {type(e).__name__}: {e}", file=sys.stderr)
                    if direction == "bwd":
                        # its saved forward graph can be gigabytes: one peer's at a time
                        impl.backward = fn = None
                        gc.collect()
                if "fastattn" not in times:
                    continue
                flops = case.flops_fwd * (case.bwd_factor if direction == "bwd" else 1.0)
                rows.append({"op": case.op, "shape": case.shape, "dir": direction, "times": times, "flops": flops})
                _print_row(rows[-1], args.matmul)
            # Release the case's inputs, saved graphs, masks and compiled kernels before the
            # next one: peers' [N, N] score graphs add up to more than this machine holds.
            case.impls.clear()
            gc.collect()
    return rows


def _print_row(row, matmul):
    ours = row["times"]["fastattn"]
    gflops = row["flops"] / ours / 1e9
    peers = "  ".join(
        f"{name} {_fmt_ms(t)} ms ({t / ours:5.2f}x)" for name, t in row["times"].items() if name != "fastattn"
    )
    print(
        f"{row['op']:<12} {row['shape']:<28} {row['dir']:<4} fastattn {_fmt_ms(ours)} ms  "
        f"{gflops:7.1f} GFLOP/s {100 * gflops / matmul:5.1f}% mm  |  {peers}",
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="threads for torch and fastattn (default 2)")
    p.add_argument("--family", action="append", choices=list(FAMILIES), help="limit to a family (repeatable)")
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--plot", metavar="PNG", help="also write a speedup plot")
    # Internal: one family per child process (see below).
    p.add_argument("--child-matmul", type=float, help=argparse.SUPPRESS)
    p.add_argument("--child-rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ["FASTATTN_NUM_THREADS"] = str(args.threads)
    torch.manual_seed(0)
    if args.child_rows:
        args.matmul = args.child_matmul
        with open(args.child_rows, "w") as f:
            json.dump(run(args), f)
        return
    print(
        f"fastattn {fastattn.__version__} | torch {torch.__version__} | {_cpu_name()} | "
        f"threads {args.threads} (fastattn {fastattn.num_threads()}, torch {torch.get_num_threads()}) | "
        f"SIMD {fastattn.simd_level()} | fp32"
    )
    args.matmul = matmul_gflops()
    print(f"fp32 matmul rate (torch.mm 2048^3, same run): {args.matmul:.1f} GFLOP/s")
    print("times are best-of-N wall clock; speedup = peer time / fastattn time\n", flush=True)
    # Each family runs in its own process: peers' multi-GB score matrices leave the heap
    # fragmented, and a later family's peers then run out of memory.
    rows = []
    for fam in args.family or list(FAMILIES):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, os.path.abspath(__file__), "--family", fam, "--threads", str(args.threads),
                   "--child-matmul", str(args.matmul), "--child-rows", out.name] + (["--quick"] if args.quick else [])
            if subprocess.run(cmd).returncode != 0:
                print(f"  family {fam}: benchmark process failed", file=sys.stderr)
                continue
            rows += json.load(open(out.name))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
