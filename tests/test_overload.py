"""Overload without collapse (issue 31): under a flood of clients that re-send as soon as they are refused, the server
keeps serving its capacity's worth of predictions within the target and refuses only the rest, before reading their
bodies, at a bounded cost. Synthetic points whose forward sleeps (a known capacity, whatever else loads the machine),
served by uvicorn on 127.0.0.1 and flooded from another process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from flexres.operating_point import OperatingPoint
from flexres.serving import LatencyModel, PointSet, ServeOptions, ServingEngine, ServingPoint
from flexres.serving.app import create_app
from flexres.serving.controller import AdaptiveController, RefusalPacer
from flexres.serving.engine import Overloaded

pytestmark = pytest.mark.serve

# Two points, most accurate first: (resolution, fixed ms, ms per image) of a batch, slept (not computed) in the forward.
SLEEPY = {"32px": (32, 40.0, 2.0), "24px": (24, 24.0, 2.0)}
MAX_BATCH = 8
TARGET_MS = 150.0
CHEAPEST_BATCH_MS = SLEEPY["24px"][1] + SLEEPY["24px"][2] * MAX_BATCH  # 40 ms for a full batch
CAPACITY = MAX_BATCH / (CHEAPEST_BATCH_MS / 1000.0)  # 200 predictions/s at the cheapest point, in full batches


def sleepy_points() -> PointSet:
    points = []
    for i, (res, fixed, per) in enumerate(SLEEPY.values()):

        def run(x, fixed=fixed, per=per, i=i):
            time.sleep((fixed + per * x.shape[0]) / 1000)
            logits = torch.zeros(x.shape[0], 3)
            logits[:, i] = 5.0
            return logits

        points.append(ServingPoint(OperatingPoint(res), macs=[30, 10][i] * 10**6, top1=[80.0, 70.0][i], run=run))
    return PointSet(points, ["a", "b", "c"], ["A", "B", "C"], "sleepy", "table")


def sleepy_latency(learn: bool = True) -> LatencyModel:
    return LatencyModel(
        {k: f for k, (_, f, _) in SLEEPY.items()}, {k: p for k, (_, _, p) in SLEEPY.items()}, learn=learn
    )


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


@contextlib.contextmanager
def serving(app):
    """uvicorn with ``app`` on a free port of 127.0.0.1, on a thread of this process; yields the port."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


# A closed-loop flood in a process of its own (as a client would be): each connection POSTs the body again as soon as
# its answer came, whatever the answer, ignoring Retry-After. Prints one JSON list of [sent s, latency ms, status].
FLOOD = r"""
import asyncio, json, re, sys, time

port, connections, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
body = sys.stdin.buffer.read()
head = (
    "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
    f"Content-Length: {len(body)}\r\n\r\n"
).encode()
answers = []

async def connection(start, deadline):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        writer.write(head + body)
        headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", headers).group(1))
        await reader.readexactly(length)
        answers.append([sent - start, (time.perf_counter() - sent) * 1000, int(headers.split(b" ", 2)[1])])
    writer.close()

async def main():
    start = time.perf_counter()
    await asyncio.gather(*(connection(start, start + seconds) for _ in range(connections)))

asyncio.run(main())
print(json.dumps(answers))
"""


def flood(port: int, connections: int, seconds: float, body: bytes) -> list[tuple[float, float, int]]:
    out = subprocess.run(
        [sys.executable, "-c", FLOOD, str(port), str(connections), str(seconds)],
        input=body,
        capture_output=True,
        timeout=120 + seconds,
        check=True,
    )
    return [tuple(a) for a in json.loads(out.stdout)]


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q / 100 * (len(v) - 1)))]


def test_a_flood_far_above_capacity_still_gets_the_capacitys_predictions_within_the_target_and_503_for_the_rest():
    """96 connections that re-send at once, against a server that can answer about 20 within the 150 ms target (about
    200 predictions/s, in full batches of 8 at its cheapest point, 40 ms each): at least 40 % of the capacity is served
    (the code before issue 31 served under 30 %) as 200s, most of them within the target, every other answer is a 503
    (held for its turn, never long), and /metrics shows the flows and the point. Bounds from the slept batch time,
    generous for a busy machine: on 2 cores shared with two trainings, 12 runs gave 132-179 predictions/s, 200s' p50
    92-118 ms and p99 131-250 ms; before issue 31, 57-59 predictions/s, p50 180 ms and p99 224-232 ms, with 2,700-2,900
    refusals/s."""
    engine = ServingEngine(
        sleepy_points(), ServeOptions(target_p95_ms=TARGET_MS, max_batch=MAX_BATCH), latency=sleepy_latency()
    )
    with serving(create_app(engine=engine)) as port:
        answers = flood(port, connections=96, seconds=3.0, body=jpeg())
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert {status for _, _, status in answers} <= {200, 503}, answers
    steady = [(ms, status) for sent, ms, status in answers if sent >= 0.5]  # the first half second: the point settles
    served = [ms for ms, status in steady if status == 200]
    refused = [ms for ms, status in steady if status == 503]
    per_s = len(served) / 2.5
    assert per_s >= 0.4 * CAPACITY, f"{per_s:.0f} predictions/s, {len(refused) / 2.5:.0f} refusals/s"
    assert len(refused) > len(served)  # the excess is refused, not queued
    assert percentile(served, 50) <= TARGET_MS and percentile(served, 99) <= 2 * TARGET_MS, (
        f"200s: p50 {percentile(served, 50):.0f} ms, p99 {percentile(served, 99):.0f} ms"
    )
    assert percentile(refused, 99) <= 1000.0  # a refusal waits its turn, at most 500 ms (RefusalPacer.max_delay_ms)
    # a point never served has no sample at all
    served_at = {
        point: float(m[1])
        if (m := re.search(rf'flexres_operating_point_total{{point="{point}"}} (\S+)', metrics))
        else 0.0
        for point in SLEEPY
    }
    assert served_at["24px"] >= 0.8 * sum(served_at.values())  # overloaded: the cheapest point
    assert 'flexres_serving_point{point="24px"}' in metrics  # the point of the last batch, 1 for it and 0 for the other
    for flow in ("admitted", "refused", "served"):
        assert f'flexres_per_second{{flow="{flow}"}}' in metrics
    assert "flexres_admitted_total" in metrics and "flexres_served_total" in metrics


def test_a_refusal_is_decided_before_the_body_is_read():
    """An overloaded server answers 503 without reading a byte of the body (the ASGI app never calls receive)."""
    engine = ServingEngine(
        sleepy_points(),
        ServeOptions(target_p95_ms=TARGET_MS, max_batch=MAX_BATCH, max_queue=2),
        latency=sleepy_latency(learn=False),
    )
    app = create_app(engine=engine)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"x"), (b"content-type", b"image/jpeg"), (b"content-length", b"100000")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    sent = []

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    engine.inflight = 2  # the queue is full
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 503 and b"queue is full" in sent[1]["body"]
    assert dict(sent[0]["headers"])[b"retry-after"] == b"1"


def test_refusals_are_answered_at_once_up_to_their_rate_then_in_turn():
    pacer = RefusalPacer(rate_per_s=1000.0, burst_s=0.01, max_delay_ms=50.0)  # 1 ms apart, 10 at once
    now = 1000.0
    assert [pacer.delay_ms(now) for _ in range(10)] == [0.0] * 10  # the burst
    assert [pacer.delay_ms(now) for _ in range(3)] == pytest.approx([0.0, 1.0, 2.0])  # then one per ms
    later = [pacer.delay_ms(now) for _ in range(60)]
    assert later[-1] == 50.0 and max(later) == 50.0  # never held past max_delay_ms
    assert pacer.delay_ms(now + 10_000) == 0.0  # quiet again: at once
    assert RefusalPacer(rate_per_s=None).delay_ms(now) == 0.0


def test_admission_is_bounded_by_what_the_cheapest_point_serves_within_the_target():
    """Requests free to run at the cheapest point join its batches, and the target keeps room for one full batch a
    request may miss (40 ms): 110 ms is two batches of 8 (80 ms) and one of 3 (30 ms), so 19 are admitted and the 20th
    refused (two batches and one of 4: 112 ms). Its 503 is held for its turn when refusals come faster than their rate,
    and every flow is counted."""
    engine = ServingEngine(
        sleepy_points(),
        ServeOptions(target_p95_ms=TARGET_MS, max_batch=MAX_BATCH, max_refusals_per_s=100),
        latency=sleepy_latency(learn=False),
    )
    engine.pacer.burst_s = 0.0
    for _ in range(19):
        engine.admit(engine.constrain())
    with pytest.raises(Overloaded, match="predicted 112 ms") as first:
        engine.admit(engine.constrain())
    with pytest.raises(Overloaded) as second:
        engine.admit(engine.constrain())
    assert first.value.delay_s == 0.0 and second.value.delay_s == pytest.approx(0.01, abs=2e-3)  # 100/s: 10 ms apart
    pinned = engine.constrain(resolution=32)  # pinned to the costlier point: it cannot join the cheap batches
    c = AdaptiveController(["32px", "24px"], sleepy_latency(learn=False), TARGET_MS, MAX_BATCH)
    assert c.admits(8, 0.0, pinned.allowed) == (True, pytest.approx(40 + 42))
    engine.finish(engine.clock(), answered=True)
    engine.metrics.roll(1.0)
    text = engine.metrics.render().decode()
    assert "flexres_admitted_total 19.0" in text and 'flexres_rejected_total{reason="over_target"} 2.0' in text
    assert 'flexres_per_second{flow="admitted"} 19.0' in text and 'flexres_per_second{flow="refused"} 2.0' in text
    assert 'flexres_per_second{flow="served"} 1.0' in text and "flexres_served_total 1.0" in text
