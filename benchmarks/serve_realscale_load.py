"""Serving at real cost under load (issue 26): the real-scale EfficientNet-Lite0 RS-Net, per backend and mode.

    python benchmarks/serve_realscale_load.py --run runs/realscale/RS-Net --target-p95-ms 50 \\
        --out benchmarks/results/serving/realscale_load_per_backend.json --plot docs/serve_realscale_load.png

For each backend (torch: the adaptive model in eager PyTorch; ort: one ONNX Runtime session per point; ort-int8: the
same, int8 calibrated per resolution) and each mode (fixed:224 and fixed:96 serve one resolution and queue; adaptive
keeps p95 under the target by lowering the point), a fresh `flexres serve` gets
  (1) the open-loop Poisson ramp of serve_load.py (--rates, --seconds per step, real val JPEGs), and
  (2) the closed-loop wrk flood of serve_flood.py (--connections, --flood-seconds per row, one JPEG).
The break point of a mode is the first offered load whose p95 is over the target. The server's model runs with
--threads threads (torch and ONNX Runtime alike); wrk or the Python load generator share the same machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from _common import IMAGENETTE, data_path
from serve_flood import DEFAULT_IMAGE, commit, flood_server, machine
from serve_load import breaks_at, load_images, ramp_server

BACKENDS = {"torch": ["--backend", "torch"], "ort": ["--backend", "ort"], "ort-int8": ["--backend", "ort", "--int8"]}


def mode_args(mode: str, target_p95_ms: float) -> list[str]:
    if mode == "adaptive":
        return ["--target-p95-ms", f"{target_p95_ms:g}"]
    if mode.startswith("fixed:"):
        return ["--resolution", mode.split(":", 1)[1]]
    raise SystemExit(f"mode {mode!r}: expected 'adaptive' or 'fixed:RESOLUTION'")


def summary(result: dict) -> dict:
    """Break points per backend and mode, and the two ratios the issue asks for (None where a mode never broke)."""
    breaks = {b: {m: r["breaks_at_rps"] for m, r in modes.items()} for b, modes in result["backends"].items()}
    ratio = lambda a, b: round(a / b, 2) if a and b else None  # noqa: E731
    out = {
        "breaks_at_rps": breaks,
        "adaptive_vs_fixed224": {b: ratio(m.get("adaptive"), m.get("fixed:224")) for b, m in breaks.items()},
    }
    if "torch" in breaks:
        out["vs_torch"] = {
            b: {m: ratio(v, breaks["torch"].get(m)) for m, v in m_.items()} for b, m_ in breaks.items() if b != "torch"
        }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(result["backends"])
    fig, axes = plt.subplots(1, len(backends), figsize=(4.6 * len(backends), 4.0), sharey=True, squeeze=False)
    for ax, backend in zip(axes[0], backends):
        for mode, r in result["backends"][backend].items():
            steps = r.get("ramp") or []
            ax.plot(
                [s["offered_rps"] for s in steps], [s["p95_ms"] or float("nan") for s in steps], marker="o", label=mode
            )
        ax.axhline(result["target_p95_ms"], color="grey", linestyle="--", label="p95 target")
        ax.set(xscale="log", yscale="log", xlabel="offered load (requests/s)", title=backend)
        ax.set_xticks(result["rates"], [f"{r:g}" for r in result["rates"]])
        ax.minorticks_off()
    axes[0][0].set_ylabel("p95 latency of answered requests (ms)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"flexres serve, {result['run']}: open-loop ramp on {result['machine']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--target-p95-ms", type=float, default=50.0)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--modes", nargs="+", default=["fixed:224", "fixed:96", "adaptive"])
    p.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40, 80, 160, 320])
    p.add_argument("--seconds", type=float, default=6.0, help="length of each ramp step")
    p.add_argument("--connections", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--flood-seconds", type=float, default=8.0)
    p.add_argument("--no-flood", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="the model's threads, every backend")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    images = load_images(args.data, args.images)
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "code": commit(),
        "run": args.run,
        "target_p95_ms": args.target_p95_ms,
        "threads": args.threads,
        "rates": args.rates,
        "seconds_per_step": args.seconds,
        "flood_seconds": args.flood_seconds,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "backends": {},
    }
    for backend in args.backends:
        for mode in args.modes:
            serve_args = [*BACKENDS[backend], *mode_args(mode, args.target_p95_ms), "--threads", str(args.threads)]
            print(f"== {backend} {mode}: flexres serve {args.run} {' '.join(serve_args)}", flush=True)
            steps, points = ramp_server(args.run, serve_args, images, args.rates, args.seconds, 0, threads=args.threads)
            entry = {
                "serve_args": serve_args,
                "ramp": steps,
                "breaks_at_rps": breaks_at(steps, args.target_p95_ms),
                "points": [pt.get("name") for pt in points],
            }
            if not args.no_flood:
                entry["flood"] = flood_server(
                    args.run,
                    serve_args,
                    args.connections,
                    args.flood_seconds,
                    data_path(DEFAULT_IMAGE),
                    threads=args.threads,
                )
            result["backends"].setdefault(backend, {})[mode] = entry
            result["summary"] = summary(result)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps(result, indent=1) + "\n"
            )  # after every mode: a stopped run keeps what it has
    print(json.dumps(result["summary"], indent=1))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
