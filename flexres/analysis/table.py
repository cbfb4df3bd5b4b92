"""The query table (MutualNet Sec. 3.4 / Resizable-NAS): accuracy and cost of every operating point,
its Pareto frontier, and the best point under a MACs or latency budget."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

TABLE = "table.json"


def scale_configurations(factors: tuple[float, ...] | None, num_stages: int, spec: str | None,
                         seed: int = 0) -> list[tuple[float, ...] | None]:
    """Resizable-NAS: 'all' per-stage configurations of ``factors``, or a seeded sample of N; [None] when
    ``spec`` is None (a model without per-stage scales)."""
    import itertools

    import torch

    if spec is None:
        return [None]
    if factors is None:
        raise ValueError("scaling configurations need a resizable model")
    every = list(itertools.product(factors, repeat=num_stages))
    if spec == "all":
        return every
    try:
        n = int(spec)
    except ValueError:
        raise ValueError(f"scales must be 'all' or a number of configurations, got {spec!r}") from None
    pick = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [every[i] for i in sorted(pick)]


def parse_range(text: str) -> list[float]:
    """'0.25:1.0:0.05' -> [0.25, 0.3, ..., 1.0] (both ends included); '0.5' -> [0.5]."""
    parts = [float(p) for p in text.split(":")]
    if len(parts) == 1:
        return parts
    if len(parts) != 3 or parts[2] <= 0 or parts[0] > parts[1]:
        raise ValueError(f"expected START:STOP:STEP with START <= STOP and STEP > 0, got {text!r}")
    start, stop, step = parts
    n = int(round((stop - start) / step))
    values = [round(start + i * step, 6) for i in range(n + 1)]
    if abs(values[-1] - stop) > 1e-6:
        values.append(stop)
    return values


def pareto_front(rows: list[dict[str, Any]], cost: str = "macs") -> list[dict[str, Any]]:
    """Rows no other row beats: none is at most as costly and strictly more accurate (or cheaper and as accurate)."""
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (r[cost], -r["top1"])):
        if row["top1"] > best:
            front.append(row)
            best = row["top1"]
    return front


def select(rows: list[dict[str, Any]], max_macs: float | None = None, max_latency_ms: float | None = None) -> dict[str, Any]:
    """The most accurate operating point within the budget (a point of the Pareto frontier)."""
    if (max_macs is None) == (max_latency_ms is None):
        raise ValueError("give exactly one budget: max_macs or max_latency_ms")
    cost, budget = ("macs", max_macs) if max_macs is not None else ("latency_ms", max_latency_ms)
    if cost == "latency_ms" and any(r.get("latency_ms") is None for r in rows):
        raise ValueError("the table has no latency column; build it with `flexres table RUN --latency`")
    front = pareto_front(rows, cost)
    fits = [r for r in front if r[cost] <= budget]
    if not fits:
        cheapest = front[0]
        shown = f"{budget / 1e6:.1f} MMACs" if cost == "macs" else f"{budget:g} ms"
        have = f"{cheapest['macs'] / 1e6:.1f} MMACs" if cost == "macs" else f"{cheapest['latency_ms']:.2f} ms"
        raise ValueError(f"no operating point fits a budget of {shown}: the cheapest in the table, width {cheapest['width']:g} at "
                         f"{cheapest['resolution']} px, costs {have}")
    return max(fits, key=lambda r: (r["top1"], -r[cost]))


def mark_pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set each row's ``pareto_macs``: whether it is on the accuracy-vs-MACs frontier. Returns ``rows``."""
    front = {id(r) for r in pareto_front(rows)}
    for r in rows:
        r["pareto_macs"] = id(r) in front
    return rows


def write_table(rows: list[dict[str, Any]], run_dir: str | Path, info: dict[str, Any]) -> list[Path]:
    run_dir = Path(run_dir)
    mark_pareto(rows)
    (run_dir / TABLE).write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    keys = ["width", "resolution", "scales", "top1", "top5", "macs", "params", "latency_ms", "pareto_macs"]
    with open(run_dir / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| width | resolution | scales | top-1 | top-5 | MMACs | params (M) | latency (ms) | Pareto (MACs) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["macs"]):
        lat = f"{r['latency_ms']:.2f}" if r.get("latency_ms") is not None else ""
        sc = "-".join(f"{f:g}" for f in r["scales"]) if r.get("scales") else ""
        lines.append(f"| {r['width']:g} | {r['resolution']} | {sc} | {r['top1']:.1f} | {r['top5']:.1f} | {r['macs'] / 1e6:.1f} | "
                     f"{r['params'] / 1e6:.3f} | {lat} | {'yes' if r['pareto_macs'] else ''} |")
    (run_dir / "table.md").write_text("\n".join(lines) + "\n")
    return [run_dir / TABLE, run_dir / "table.csv", run_dir / "table.md"]


def read_table(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; build it first with `flexres table {run_dir} --data DIR`")
    return json.loads(path.read_text())["rows"]
