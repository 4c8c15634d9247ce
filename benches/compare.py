"""Two runs of the main job side by side: fastattn's time in each and their ratio, then each
peer's speedup in each run, row by row (rows present in only one run are listed as such).

    .venv/bin/python benches/table.py --json a.json     # (or ./scripts/bench.sh --json a.json)
    .venv/bin/python benches/compare.py a.json b.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import results  # noqa: E402


def _machine(tag: str, m: dict) -> str:
    return (f"{tag}: {m.get('date', '?')} | {m.get('cpu', '?')} | threads {m.get('threads', '?')} | "
            f"SIMD {m.get('simd', '?')} | torch {m.get('torch', '?')} | peak {m.get('peak_gflops', 0):.1f} GFLOP/s "
            f"| mm {m.get('matmul_gflops', 0):.1f} GFLOP/s | {m.get('mode', '?')}")


def _speedup(row: dict | None, peer: str) -> str:
    if row is None:
        return "-"
    if peer in row["speedup"]:
        mark = "~" if (row["spread"].get(peer) or 0) > 0.15 else ""
        return f"{row['speedup'][peer]:.2f}x{mark}"
    return "skipped" if peer in row.get("skipped", {}) else "-"


def compare(a_path: str, b_path: str) -> list[str]:
    ma, ra = results.load(a_path)
    mb, rb = results.load(b_path)
    lines = [_machine("A", ma), _machine("B", mb), ""]
    by_b = {results.key(r): r for r in rb}
    seen = set()
    for row in ra:
        k = results.key(row)
        seen.add(k)
        other = by_b.get(k)
        label = f"{k[0]:<12} {k[1]:<28} {k[2]:<4}"
        ta = row["times"]["fastattn"]
        if other is None:
            lines.append(f"{label} fastattn A {ta * 1e3:9.2f} ms  (not in B)")
            continue
        tb = other["times"]["fastattn"]
        peers = [p for p in row["times"] if p != "fastattn"]
        peers += [p for p in other["times"] if p != "fastattn" and p not in peers]
        cells = "  ".join(f"{p} {_speedup(row, p)} -> {_speedup(other, p)}" for p in peers)
        lines.append(f"{label} fastattn A {ta * 1e3:9.2f} ms  B {tb * 1e3:9.2f} ms  B/A {tb / ta:5.2f}  |  {cells}")
    for row in rb:
        k = results.key(row)
        if k not in seen:
            lines.append(f"{k[0]:<12} {k[1]:<28} {k[2]:<4} fastattn B {row['times']['fastattn'] * 1e3:9.2f} ms  (not in A)")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="JSON of the first run (table.py --json)")
    p.add_argument("b", help="JSON of the second run")
    args = p.parse_args(argv)
    print("\n".join(compare(args.a, args.b)))


if __name__ == "__main__":
    main()
