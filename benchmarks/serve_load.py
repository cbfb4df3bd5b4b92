"""Load ramp against `flexres serve` on 127.0.0.1: fixed largest point, fixed smallest point, and adaptive (a p95
target).

For each mode the script starts a server on the run, waits for /health, then offers an open-loop Poisson load that
steps up through --rates (requests/s, each for --seconds), posting real validation JPEGs. It records, per step: client
latency p50/p95/p99 of answered requests, throughput, the share refused with 503, the expected top-1 of the points
served (from the run's query table) and the top-1 actually obtained on those labelled images. Bounded: at most
sum(rates) x seconds requests per mode, localhost only.

    python benchmarks/serve_load.py --run runs/serve_rsnet \\
        --target-p95-ms 40 --out benchmarks/results/serving/ramp_rsnet_three_modes.json --plot docs/serve_load_rsnet.png

The server gets one core (OMP_NUM_THREADS=1) and the load generator the other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
from _common import IMAGENETTE, data_path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def load_images(data: Path, n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    files = sorted((data / "val").rglob("*.JPEG"))
    random.Random(seed).shuffle(files)
    return [(f.read_bytes(), f.parent.name) for f in files[:n]]


async def ramp(url: str, images: list[tuple[bytes, str]], rates: list[float], seconds: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    steps = []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        for rate in rates:
            records: list[dict] = []

            async def one(img: bytes, label: str) -> None:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict", content=img, headers={"content-type": "image/jpeg"})
                    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                    records.append(
                        {
                            "ms": (time.perf_counter() - t0) * 1000,
                            "status": r.status_code,
                            "done": time.perf_counter(),
                            "point": body.get("operating_point", {}).get("name"),
                            "expected_top1": body.get("operating_point", {}).get("expected_top1"),
                            "correct": body["top"][0]["class"] == label if "top" in body else None,
                        }
                    )
                except httpx.HTTPError as e:
                    records.append(
                        {
                            "ms": (time.perf_counter() - t0) * 1000,
                            "status": type(e).__name__,
                            "done": time.perf_counter(),
                        }
                    )

            tasks, start, k = [], time.perf_counter(), 0
            next_at = start
            while next_at - start < seconds:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                img, label = images[k % len(images)]
                tasks.append(asyncio.create_task(one(img, label)))
                k += 1
                next_at += rng.expovariate(rate)
            sent_s = time.perf_counter() - start
            await asyncio.gather(*tasks)
            window_s = (
                max(r["done"] for r in records) - start
            )  # answers that arrive after the step still count, over their time
            ok = [r for r in records if r["status"] == 200]
            lat = [r["ms"] for r in ok]
            points: dict[str, int] = {}
            for r in ok:
                points[r["point"]] = points.get(r["point"], 0) + 1
            exp = [r["expected_top1"] for r in ok if r["expected_top1"] is not None]
            steps.append(
                {
                    "offered_rps": rate,
                    "sent": len(records),
                    "sent_rps": round(len(records) / sent_s, 1),
                    "answered": len(ok),
                    "throughput_rps": round(len(ok) / window_s, 1),
                    "refused_503": sum(r["status"] == 503 for r in records),
                    "errors": sum(r["status"] not in (200, 503) for r in records),
                    "p50_ms": percentile(lat, 50),
                    "p95_ms": percentile(lat, 95),
                    "p99_ms": percentile(lat, 99),
                    "expected_top1": statistics.mean(exp) if exp else None,
                    "top1": 100 * statistics.mean(r["correct"] for r in ok) if ok else None,
                    "points": points,
                }
            )
            s = steps[-1]
            print(
                f"  {rate:6.0f} req/s offered: {s['throughput_rps']:6.1f} answered/s, 503 {s['refused_503']:4d}, "
                f"p50 {s['p50_ms'] or 0:7.1f} p95 {s['p95_ms'] or 0:7.1f} p99 {s['p99_ms'] or 0:7.1f} ms, "
                f"expected top-1 {s['expected_top1'] or 0:.1f}, top-1 {s['top1'] or 0:.1f}",
                flush=True,
            )
            await asyncio.sleep(1.0)  # let the queue drain between steps
    return steps


def start_server(run: str, port: int, extra: list[str], code: Path | None = None, threads: int = 1) -> subprocess.Popen:
    """`flexres serve run` on 127.0.0.1:port, once /health answers. ``code``: a directory holding another copy of the
    flexres package (an earlier commit: ``git archive COMMIT flexres | tar -x -C DIR``) to serve with instead.
    ``threads``: the server's OMP_NUM_THREADS (what the inference process's torch uses)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if code is not None:  # first on the path (python -m puts the working directory first: run there)
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
        run = str(Path(run).resolve())
    cmd = [sys.executable, "-m", "flexres.cli", "serve", run, "--port", str(port), *extra]
    # To a file, not a pipe nobody reads: under a flood the server's log lines would fill the pipe and block it.
    # An unnamed one, so that nothing is left in /tmp once the server and this process have closed it.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=code)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not come up within 300 s")


def ramp_server(
    run: str,
    serve_args: list[str],
    images: list[tuple[bytes, str]],
    rates: list[float],
    seconds: float,
    seed: int,
    threads: int = 1,
    code: Path | None = None,
) -> tuple[list[dict], list[dict]]:
    """Start `flexres serve run *serve_args` (with the flexres package in ``code``, if given), ramp it, stop it: the
    steps and the points it served (its /points)."""
    port = free_port()
    proc = start_server(run, port, serve_args, code=code, threads=threads)
    try:
        steps = asyncio.run(ramp(f"http://127.0.0.1:{port}", images, rates, seconds, seed))
        return steps, httpx.get(f"http://127.0.0.1:{port}/points").json()["points"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def breaks_at(steps: list[dict], target_p95_ms: float) -> float | None:
    """The first offered load whose p95 (of answered requests) is over the target, or that got no answer at all."""
    broken = [s["offered_rps"] for s in steps if s["p95_ms"] is None or s["p95_ms"] > target_p95_ms]
    return broken[0] if broken else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, steps in result["modes"].items():
        x = [s["offered_rps"] for s in steps]
        a.plot(x, [s["p95_ms"] for s in steps], marker="o", label=mode)
        b.plot(x, [s["expected_top1"] for s in steps], marker="o", label=f"{mode} (expected)")
        b.plot(x, [s["top1"] for s in steps], marker="x", linestyle=":", label=f"{mode} (measured)")
    a.axhline(result["target_p95_ms"], color="grey", linestyle="--", label="p95 target")
    a.set(
        xscale="log", yscale="log", xlabel="offered load (requests/s)", ylabel="p95 latency (ms)", title="p95 latency"
    )
    b.set(
        xscale="log", xlabel="offered load (requests/s)", ylabel="top-1 % of answered requests", title="accuracy served"
    )
    for ax in (a, b):  # label the offered rates themselves; log-axis minor labels overlap
        ax.set_xticks(result["rates"], [f"{r:g}" for r in result["rates"]])
        ax.xaxis.set_minor_formatter(NullFormatter())
    a.legend(fontsize=8)
    b.legend(fontsize=7)
    fig.suptitle(f"flexres serve, {result['run']}: load ramp on {result['machine']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run with a query table (flexres table)")
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--rates", type=float, nargs="+", default=[10, 25, 50, 100, 200, 400])
    p.add_argument("--seconds", type=float, default=8.0, help="length of each load step")
    p.add_argument("--target-p95-ms", type=float, default=40.0)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--modes", nargs="+", default=["fixed-largest", "fixed-smallest", "adaptive"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-arg", action="append", default=[], help="one more `flexres serve` argument (repeat it)")
    p.add_argument("--code", type=Path, help="serve with the flexres package in this directory (an earlier commit)")
    p.add_argument("--label", default="", help="recorded with the results (e.g. before, after)")
    args = p.parse_args()
    mode_args = {"adaptive": ["--target-p95-ms", str(args.target_p95_ms)]}
    if set(args.modes) - {"adaptive"}:  # the fixed modes serve the query table's largest and smallest Pareto points
        table = json.loads((Path(args.run) / "table.json").read_text())
        front = [r for r in table["rows"] if r.get("pareto_macs")]
        mode_args["fixed-largest"] = ["--resolution", str(max(front, key=lambda r: r["macs"])["resolution"])]
        mode_args["fixed-smallest"] = ["--resolution", str(min(front, key=lambda r: r["macs"])["resolution"])]
    images = load_images(args.data, args.images, args.seed)
    result = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "run": str(args.run),
        "target_p95_ms": args.target_p95_ms,
        "seconds_per_step": args.seconds,
        "rates": args.rates,
        "modes": {},
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "label": args.label,
        "code": str(args.code) if args.code else "working tree",
    }
    for mode in args.modes:
        print(f"== {mode}: flexres serve {args.run} {' '.join(mode_args[mode])}", flush=True)
        result["modes"][mode], points = ramp_server(
            str(args.run),
            [*mode_args[mode], *args.serve_arg],
            images,
            args.rates,
            args.seconds,
            args.seed,
            code=args.code,
        )
        result.setdefault("points", points)
    result["breaks_target_at_rps"] = {
        mode: breaks_at(steps, args.target_p95_ms) for mode, steps in result["modes"].items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result["breaks_target_at_rps"]))


if __name__ == "__main__":
    main()
