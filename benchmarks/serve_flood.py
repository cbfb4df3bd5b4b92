"""Closed-loop flood against `flexres serve`: wrk keeps N connections busy, each POSTing the same JPEG as soon as its
last answer came, ignoring Retry-After (the client that refusals do not slow down). Per connection count it records
what the server answered (200 and 503 counts from its own /metrics, before and after) and the client's latency
percentiles over every answer. Bounded in time (--seconds per row), localhost only; needs wrk (Debian: apt install wrk).

    python benchmarks/serve_flood.py --run runs/serve_rsnet --target-p95-ms 30 --connections 4 16 64 256 \\
        --out benchmarks/results/serve_flood_rsnet.json
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
from serve_load import ROOT, free_port, start_server

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "imagenette-224" / "val" / "n01440764" / "ILSVRC2012_val_00009191.JPEG"

# wrk's Lua hooks: the body is the image, and done() prints one JSON line the script parses.
LUA = """local f = assert(io.open({path}, "rb")); local body = f:read("*all"); f:close()
wrk.method = "POST"; wrk.body = body; wrk.headers["Content-Type"] = "image/jpeg"
done = function(summary, latency, requests)
  io.write(string.format('FLOOD {{"requests": %d, "seconds": %.3f, "p50_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f}}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000))
end
"""


def predict_counts(url: str) -> dict[str, float]:
    """The server's count of /predict answers by status code, from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts = {}
    for m in re.finditer(r'^flexres_requests_total\{endpoint="predict",status="(\d+)"\} (\S+)$', text, re.M):
        counts[m.group(1)] = float(m.group(2))
    return counts


def flood(wrk: str, url: str, lua: Path, connections: int, seconds: float) -> dict:
    before = predict_counts(url)
    out = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(lua), f"{url}/predict"],
                         capture_output=True, text=True, check=True).stdout
    after = predict_counts(url)
    client = json.loads(out.split("FLOOD ", 1)[1].splitlines()[0])
    diff = {code: after.get(code, 0) - before.get(code, 0) for code in set(after) | set(before)}
    per_s = {code: round(n / client["seconds"], 1) for code, n in sorted(diff.items())}
    row = {"connections": connections, **client, "answered_per_s": per_s}
    print(f"{connections:4d} connections: 200/s {per_s.get('200', 0):7.1f}  503/s {per_s.get('503', 0):7.1f}  "
          f"p50 {client['p50_ms']:.1f} ms  p95 {client['p95_ms']:.1f} ms  p99 {client['p99_ms']:.1f} ms", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="what `flexres serve` loads (a run or exported models)")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the JPEG every request posts")
    p.add_argument("--target-p95-ms", type=float, default=30.0)
    p.add_argument("--connections", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--inference", choices=("process", "thread"), default="process", help="`flexres serve --inference`")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (Debian/Ubuntu: apt install wrk); this benchmark needs a C load generator")
    if not args.image.is_file():
        raise SystemExit(f"--image {args.image} is not a file")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.run, port, ["--target-p95-ms", f"{args.target_p95_ms:g}", "--inference", args.inference])
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lua = Path(tmp) / "post.lua"
            lua.write_text(LUA.format(path=json.dumps(str(args.image.resolve()))))
            for n in args.connections:
                rows.append(flood(wrk, url, lua, n, args.seconds))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
              "run": args.run, "target_p95_ms": args.target_p95_ms, "seconds": args.seconds, "inference": args.inference,
              "http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11",
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
