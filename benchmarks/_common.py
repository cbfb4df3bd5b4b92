"""Shared by the benchmark scripts: train a run once (resume if interrupted, skip if finished) and time it."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from flexres.engine.checkpoint import SIDECAR
from flexres.engine.trainer import train

IMAGENETTE = "$FLEXRES_DATA/imagenette-224"  # the benchmarks' data, as the bundled configs name it
CAMVID = "$FLEXRES_DATA/camvid"


def data_path(text: str | Path) -> Path:
    """argparse type for --data (and its default): ``$FLEXRES_DATA/...`` expanded, a one-line error when unset. The
    benchmarks name no path outside the repository: export FLEXRES_DATA=/path/to/datasets once, or pass --data."""
    from flexres.engine.config import resolve_data_root
    from flexres.errors import ConfigError

    try:
        return Path(resolve_data_root(text))
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def add_run_options(p) -> None:
    """``--only`` and ``--set``, for scripts whose trainings are spread over processes (one label each)."""
    p.add_argument(
        "--only",
        nargs="+",
        metavar="LABEL",
        help="train only these runs (I-112, RS-Net, ...): to spread them over processes",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every run (e.g. train.amp=false)",
    )


def train_once(label: str, cfg: dict, out: Path, epochs: int) -> float:
    """Wall seconds of training ``label`` into ``out`` (from its record when it had already finished)."""
    out = Path(out)
    side, wall_file = out / SIDECAR, out / "wall_seconds.json"
    if side.exists() and json.loads(side.read_text())["epoch"] >= epochs:
        return json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else float("nan")
    t0 = time.time()
    print(f"== training {label} -> {out}", flush=True)
    train(cfg, out, resume=(out / "checkpoint.safetensors").exists(), log=lambda s: print("  " + s[:200], flush=True))
    wall = round(time.time() - t0, 1)
    wall_file.write_text(json.dumps({"seconds": wall}))
    return wall


def mean_std(values: list[float], fmt: str = ".1f") -> str:
    """``mean ± std`` (sample std) of one figure over seeds; the value alone for one seed."""
    mean = f"{statistics.mean(values):{fmt}}"
    return mean + (f" ± {statistics.stdev(values):{fmt.lstrip('+')}}" if len(values) > 1 else "")


def gap_row(label: str, res: int, runs: list[dict], inets: list[dict]) -> list[str]:
    """A table row: ``label`` minus the I-Net at ``res``, one evaluation per seed, then mean ± std."""
    gaps = [run["results"][str(res)]["top1"] - inet["results"][str(res)]["top1"] for run, inet in zip(runs, inets)]
    spread = f" ± {statistics.stdev(gaps):.1f}" if len(gaps) > 1 else ""
    return [label, str(res)] + [f"{g:+.1f}" for g in gaps] + [f"{statistics.mean(gaps):+.2f}{spread}"]


def evaluated_after(report: Path | None, run_dirs: list[Path]) -> bool:
    """Whether ``report`` (an earlier evaluation, for ``--reuse``) was written after every run's checkpoint."""
    return report is not None and all(
        report.stat().st_mtime > (Path(d) / "checkpoint.safetensors").stat().st_mtime for d in run_dirs
    )
