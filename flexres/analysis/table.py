"""The query table (MutualNet Sec. 3.4 / Resizable-NAS): accuracy and cost of every operating point, written into the
run as JSON, CSV and Markdown with its Pareto frontier marked (the front and the choice under a budget are decided in
flexres.operating_point)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..operating_point import TABLE, pareto_front


def scale_configurations(
    factors: tuple[float, ...] | None, num_stages: int, spec: str | None, seed: int = 0
) -> list[tuple[float, ...] | None]:
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
    lines = [
        "| width | resolution | scales | top-1 | top-5 | MMACs | params (M) | latency (ms) | Pareto (MACs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["macs"]):
        lat = f"{r['latency_ms']:.2f}" if r.get("latency_ms") is not None else ""
        sc = "-".join(f"{f:g}" for f in r["scales"]) if r.get("scales") else ""
        lines.append(
            f"| {r['width']:g} | {r['resolution']} | {sc} | {r['top1']:.1f} | {r['top5']:.1f} | "
            f"{r['macs'] / 1e6:.1f} | "
            f"{r['params'] / 1e6:.3f} | {lat} | {'yes' if r['pareto_macs'] else ''} |"
        )
    (run_dir / "table.md").write_text("\n".join(lines) + "\n")
    return [run_dir / TABLE, run_dir / "table.csv", run_dir / "table.md"]


def read_table(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; build it first with `flexres table {run_dir} --data DIR`")
    return json.loads(path.read_text())["rows"]
