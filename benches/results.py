"""The table's rows as JSON: one file per run, with the machine facts of its header, so two
runs (or two machines) can be compared row by row (``benches/compare.py``).

A file is ``{"format": 1, "machine": {...}, "rows": [...]}``; a row has ``op``, ``shape``,
``dir``, ``flops``, ``times`` (seconds, fastattn first), ``speedup`` and ``spread`` (per peer:
peer time / fastattn time in the same rounds, and how far those rounds disagreed),
``method`` (how each side was timed), ``skipped`` (why a peer has no time), ``gflops``,
``pct_mm``, ``pct_peak`` (None when above the peak: ``peak_error``).
"""

from __future__ import annotations

import json

FORMAT = 1


def save(path: str, machine: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "machine": machine, "rows": rows}, f, indent=1, allow_nan=False)
        f.write("\n")


def load(path: str) -> tuple[dict, list[dict]]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a benchmark table file of format {FORMAT}")
    return data["machine"], data["rows"]


def key(row: dict) -> tuple[str, str, str]:
    return row["op"], row["shape"], row["dir"]
