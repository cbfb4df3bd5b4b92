"""Closed-loop flood against `flexres serve` (issue 31): wrk keeps N connections busy, each POSTing the same JPEG as
soon as its last answer came, ignoring Retry-After (the client that refusals do not slow down). Bounded in time
(--seconds per row), localhost only; needs wrk (Debian: apt install wrk).

Per connection count, from the server's own /metrics (differences over the row): predictions (200) and refusals (503)
per second, the points served, the mean batch, and the server-side latency of the 200s and of the 503s (p50 and p99,
interpolated within the histogram's buckets; a 503's includes the hold of its turn); from wrk, its percentiles over
every answer. At the end, goodput at each concurrency as a share of the best at any lower one (the issue's goal:
>= 80 % at 64 and 256 connections).

    python benchmarks/serve_flood.py --run runs/serve_rsnet --target-p95-ms 30 --connections 4 16 64 256 \\
        --out benchmarks/results/serving/flood_rsnet.json

Before and after a change, on the same machine: export the earlier code and serve with it (--code).

    git archive HEAD flexres | tar -x -C /tmp/flexres_before
    python benchmarks/serve_flood.py --run runs/serve_rsnet --code /tmp/flexres_before --label before ...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from datetime import date
from pathlib import Path

import httpx
from _common import IMAGENETTE, data_path
from serve_load import ROOT, free_port, start_server

DEFAULT_IMAGE = f"{IMAGENETTE}/val/n01440764/ILSVRC2012_val_00009191.JPEG"  # data_path expands it

# wrk's Lua hooks: the body is the image, and done() prints one JSON line the script parses.
LUA = """local f = assert(io.open({path}, "rb")); local body = f:read("*all"); f:close()
wrk.method = "POST"; wrk.body = body; wrk.headers["Content-Type"] = "image/jpeg"
done = function(summary, latency, requests)
  io.write(string.format('FLOOD {{"requests": %d, "seconds": %.3f, "p50_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f}}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000))
end
"""
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", re.M)


def scrape(url: str) -> dict[str, float]:
    """Every sample of the server's /metrics, by its name and labels."""
    return {k: float(v) for k, v in SAMPLE.findall(httpx.get(f"{url}/metrics", timeout=30).text)}


def quantile_ms(diff: dict[str, float], histogram: str, q: float) -> float | None:
    """The q-quantile (ms) of the observations a histogram gained, interpolated linearly within its bucket."""
    buckets = sorted(
        (float(m.group(1)), n)
        for k, n in diff.items()
        if (m := re.fullmatch(rf'{histogram}_bucket\{{le="([^"]+)"\}}', k))
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    want, lower, below = q * buckets[-1][1], 0.0, 0.0
    for le, count in buckets:
        if count >= want:
            if le == float("inf"):
                return round(lower * 1000, 1)  # beyond the last finite bucket: its bound
            return round(1000 * (lower + (le - lower) * (want - below) / max(count - below, 1e-9)), 1)
        lower, below = le, count
    return None


def flood(wrk: str, url: str, lua: Path, connections: int, seconds: float) -> dict:
    before = scrape(url)
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(lua), f"{url}/predict"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = scrape(url)
    client = json.loads(out.split("FLOOD ", 1)[1].splitlines()[0])
    diff = {k: after[k] - before.get(k, 0.0) for k in after}
    s = client["seconds"]
    per_s = {
        m.group(1): round(n / s, 1)
        for k, n in diff.items()
        if (m := re.fullmatch(r'flexres_requests_total\{endpoint="predict",status="(\d+)"\}', k)) and n
    }
    points = {
        m.group(1): n
        for k, n in diff.items()
        if (m := re.fullmatch(r'flexres_operating_point_total\{point="([^"]+)"\}', k)) and n
    }
    batches = diff.get("flexres_batch_size_count", 0.0)
    row = {
        "connections": connections,
        "wrk": client,
        "answered_per_s": per_s,
        "predictions_per_s": per_s.get("200", 0.0),
        "refusals_per_s": per_s.get("503", 0.0),
        "ok_p50_ms": quantile_ms(diff, "flexres_request_latency_seconds", 0.5),
        "ok_p99_ms": quantile_ms(diff, "flexres_request_latency_seconds", 0.99),
        "refused_p50_ms": quantile_ms(diff, "flexres_refusal_latency_seconds", 0.5),  # absent before issue 31
        "refused_p99_ms": quantile_ms(diff, "flexres_refusal_latency_seconds", 0.99),
        "mean_batch": round(diff.get("flexres_batch_size_sum", 0.0) / batches, 2) if batches else None,
        "points_share": {p: round(n / sum(points.values()), 3) for p, n in sorted(points.items())},
    }
    ms = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    print(
        f"{connections:4d} connections: 200/s {row['predictions_per_s']:7.1f}  503/s {row['refusals_per_s']:7.1f}  "
        f"200s p50/p99 {ms(row['ok_p50_ms'])}/{ms(row['ok_p99_ms'])} ms  503s p50/p99 {ms(row['refused_p50_ms'])}/"
        f"{ms(row['refused_p99_ms'])} ms (server)  all p50/p99 {client['p50_ms']:.0f}/{client['p99_ms']:.0f} ms (wrk)  "
        f"batch {row['mean_batch']}  points {row['points_share']}",
        flush=True,
    )
    return row


def flood_server(
    run: str,
    serve_args: list[str],
    connections: list[int],
    seconds: float,
    image: Path,
    code: Path | None = None,
    threads: int = 1,
) -> list[dict]:
    """Start `flexres serve run *serve_args`, flood it at each connection count, stop it; the rows, each with its
    goodput as a share of the best at any lower concurrency."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit(
            "wrk is not installed (Debian/Ubuntu: apt install wrk); this benchmark needs a C load generator"
        )
    if not image.is_file():
        raise SystemExit(f"--image {image} is not a file")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(run, port, serve_args, code=code, threads=threads)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lua = Path(tmp) / "post.lua"
            lua.write_text(LUA.format(path=json.dumps(str(image.resolve()))))
            for n in connections:
                rows.append(flood(wrk, url, lua, n, seconds))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    best = 0.0
    for row in rows:
        row["goodput_vs_best_lower"] = round(row["predictions_per_s"] / best, 3) if best else None
        best = max(best, row["predictions_per_s"])
    print(
        "goodput / best at lower concurrency: "
        + ", ".join(
            f"{r['connections']}: {r['goodput_vs_best_lower']:.0%}"
            for r in rows
            if r["goodput_vs_best_lower"] is not None
        )
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="what `flexres serve` loads (a run or exported models)")
    p.add_argument("--image", type=data_path, default=DEFAULT_IMAGE, help="the JPEG every request posts")
    p.add_argument("--target-p95-ms", type=float, default=30.0)
    p.add_argument("--connections", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--inference", choices=("process", "thread"), default="process", help="`flexres serve --inference`")
    p.add_argument("--serve-arg", action="append", default=[], help="one more `flexres serve` argument (repeat it)")
    p.add_argument("--code", type=Path, help="serve with the flexres package in this directory (an earlier commit)")
    p.add_argument("--label", default="", help="recorded with the results (e.g. before, after)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.code is not None and not (args.code / "flexres" / "__init__.py").is_file():
        raise SystemExit(f"--code {args.code} holds no flexres package")
    rows = flood_server(
        args.run,
        ["--target-p95-ms", f"{args.target_p95_ms:g}", "--inference", args.inference, *args.serve_arg],
        args.connections,
        args.seconds,
        args.image,
        code=args.code,
    )
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "label": args.label,
        "code": str(args.code) if args.code else f"working tree at {commit()}",
        "run": args.run,
        "target_p95_ms": args.target_p95_ms,
        "seconds": args.seconds,
        "inference": args.inference,
        "serve_args": args.serve_arg,
        "http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


def machine() -> str:
    return f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores"


def commit() -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


if __name__ == "__main__":
    main()
