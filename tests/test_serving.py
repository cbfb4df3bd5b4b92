"""flexres serve: the adaptive controller against a synthetic latency model, dynamic batching, and every endpoint and
bad input through real HTTP (the ASGI test client) on a run trained on the bundled sample."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import flexres
from flexres.operating_point import TABLE, OperatingPoint
from flexres.serving import AdaptiveController, LatencyModel, PointSet, ServeOptions, ServingEngine, ServingPoint
from flexres.serving.app import create_app
from flexres.serving.engine import Overloaded, RequestError
from flexres.serving.errors import Refused
from flexres.serving.inference import run_batch
from flexres.serving.points import PointOptions, load_points

pytestmark = pytest.mark.serve

# Three points, most accurate first: (fixed ms, ms per image).
SYNTHETIC = {"big": (10.0, 5.0), "mid": (4.0, 2.0), "small": (1.0, 0.5)}


def synthetic_latency(names=("big", "mid", "small")) -> LatencyModel:
    costs = dict(zip(names, SYNTHETIC.values()))
    return LatencyModel({k: f for k, (f, _) in costs.items()}, {k: s for k, (_, s) in costs.items()}, learn=False)


def test_controller_lowers_the_point_as_the_queue_grows_and_raises_it_as_it_drains():
    c = AdaptiveController(
        ["big", "mid", "small"], synthetic_latency(), target_ms=50, max_batch=8
    )  # headroom 0.8: 40 ms
    # 1 queued: big takes 10 + 5 = 15 ms. 8 queued: big 10 + 40 = 50 > 40, mid 4 + 16 = 20. 40 queued: five batches,
    # mid 5 x 20 = 100, small 5 x (1 + 4) = 25. 400 queued: small needs 50 x 5 = 250, over at every point: the fastest.
    seq = [c.choose(q) for q in (1, 8, 40, 400, 40, 8, 1)]
    assert [d.point for d in seq] == ["big", "mid", "small", "small", "small", "mid", "big"]
    assert [round(d.predicted_ms, 6) for d in seq[:4]] == [15.0, 20.0, 25.0, 250.0]
    assert seq[3].reason == "over target at every point"
    # The oldest request's wait counts: after 30 ms in the queue, big (30 + 15 = 45 ms) no longer fits.
    assert c.choose(1, oldest_wait_ms=30).point == "mid"
    # A request's own budget and allowed points.
    assert c.choose(1, target_ms=5).point == "small"  # 4 ms allowed: mid takes 6, small 1.5
    assert c.choose(1, allowed=["mid", "small"]).point == "mid"


def test_feedback_from_observed_latency_tightens_and_then_relaxes_the_plan():
    c = AdaptiveController(["big", "mid", "small"], synthetic_latency(), target_ms=50, max_batch=8)
    assert c.choose(1).point == "big"  # 15 ms planned against 40
    for _ in range(4):  # clients saw 80 ms: something outside the model costs time; 40 x 0.85^4 = 20.9 ms
        c.feedback(80.0)
    assert c.scale == pytest.approx(0.85**4) and c.choose(1).point == "big"
    c.feedback(80.0)  # 17.7 ms: big (15) still fits one request, not two (20)
    assert c.choose(2).point == "mid"
    c.feedback(40.0)  # between 70 % and 100 % of the target: hold
    assert c.scale == pytest.approx(0.85**5)
    for _ in range(20):
        c.feedback(10.0)
    assert c.scale == 1.0 and c.choose(2).point == "big"


def test_admission_refuses_what_even_the_cheapest_point_cannot_answer_in_time():
    c = AdaptiveController(["big", "mid", "small"], synthetic_latency(), target_ms=50, max_batch=8)
    ok, ms = c.admits(ahead=8, busy_ms=0)  # one batch of 8 at small (1 + 4), then this one alone at small (1.5)
    assert ok and ms == pytest.approx(5 + 1.5)
    ok, ms = c.admits(ahead=8, busy_ms=0, allowed=["big"])  # pinned to big: its own batch takes 15
    assert ok and ms == pytest.approx(5 + 15)
    ok, ms = c.admits(ahead=80, busy_ms=10)  # 10 batches of small (5 ms each) behind 10 ms in flight
    assert not ok and ms == pytest.approx(10 + 50 + 1.5)
    ok, ms = c.admits(
        ahead=8, busy_ms=0, overhead_ms=45
    )  # its own decoding, 45 ms, makes it miss (others decode meanwhile)
    assert not ok and ms == pytest.approx(5 + 1.5 + 45)


def test_latency_model_fits_two_batch_sizes_and_learns_a_slowdown():
    fitted = LatencyModel.measure(["big", "small"], lambda p, b: SYNTHETIC[p][0] + SYNTHETIC[p][1] * b, max_batch=8)
    for p in ("big", "small"):
        assert fitted.fixed_ms[p] == pytest.approx(SYNTHETIC[p][0]) and fitted.per_image_ms[p] == pytest.approx(
            SYNTHETIC[p][1]
        )
    before = fitted.batch_ms("small", 4)
    for _ in range(40):  # the machine got twice as slow: observed at "big", predicted for every point
        fitted.observe("big", 2, 2 * (10 + 5 * 2))
    assert fitted.correction == pytest.approx(2.0, rel=1e-3)
    assert fitted.batch_ms("small", 4) == pytest.approx(2 * before, rel=1e-3)
    fitted.observe("big", 1, 1e6)  # one outlier moves the average by at most smoothing x 20
    assert fitted.correction < 2.0 * 0.8 + 0.2 * 20 + 1e-9


POINT_NAMES = ("64px", "48px", "32px")


def synthetic_points(sleep: bool = False) -> PointSet:
    """Points whose forward sleeps what the synthetic latency model says (when ``sleep``) and returns class = index."""
    points = []
    for i, (name, res) in enumerate([("big", 64), ("mid", 48), ("small", 32)]):
        fixed, per = SYNTHETIC[name]

        def run(x, fixed=fixed, per=per, i=i):
            if sleep:
                time.sleep((fixed + per * x.shape[0]) / 1000)
            logits = torch.zeros(x.shape[0], 3)
            logits[:, i] = 5.0
            return logits

        points.append(
            ServingPoint(OperatingPoint(res), macs=[30, 10, 3][i] * 10**6, top1=[80.0, 70.0, 60.0][i], run=run)
        )
    return PointSet(points, ["a", "b", "c"], ["A", "B", "C"], "synthetic", "table")


def test_dynamic_batches_follow_the_queue_and_each_request_keeps_its_own_constraint():
    engine = ServingEngine(
        synthetic_points(sleep=True),
        ServeOptions(target_p95_ms=50, max_batch=8, max_wait_ms=5),
        latency=synthetic_latency(POINT_NAMES),
    )
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)

    async def burst():
        await engine.start()
        try:
            pinned = engine.constrain(resolution=64)  # must run at "big" whatever the load
            adaptive = engine.constrain()
            jobs = [engine.submit(image, pinned if i % 10 == 0 else adaptive) for i in range(30)]
            results = await asyncio.gather(*jobs)
            engine.controller.scale = 1.0  # whatever the sleeps' overshoot taught the feedback on this busy machine
            after = await engine.submit(image, adaptive)  # the queue has drained: back to the best point
            return results, after
        finally:
            await engine.stop()

    results, after = asyncio.run(burst())
    points = [r["operating_point"]["name"] for r in results]
    assert all(points[i] == "64px" for i in range(0, 30, 10))
    assert "32px" in points  # 30 queued at once: only the smallest point drains them in time
    assert max(r["batch_size"] for r in results) == 8 and min(r["batch_size"] for r in results) >= 1
    tops = {r["operating_point"]["name"]: r["top"][0]["class"] for r in results}
    assert tops["32px"] == "c" and tops["64px"] == "a"  # each batch really ran at its point
    assert after["operating_point"]["name"] == "64px" and after["batch_size"] == 1


def test_over_target_requests_get_overloaded_with_a_retry_time():
    slow = LatencyModel(dict(zip(POINT_NAMES, (5000.0, 3000.0, 2000.0))), dict.fromkeys(POINT_NAMES, 1.0), learn=False)
    engine = ServingEngine(synthetic_points(), ServeOptions(target_p95_ms=100), latency=slow)

    async def one():
        await engine.start()
        try:
            await engine.submit(torch.zeros(3, 8, 8, dtype=torch.uint8), engine.constrain())
        finally:
            await engine.stop()

    with pytest.raises(Overloaded) as e:
        asyncio.run(one())
    assert e.value.retry_after == 3  # ceil(2001 ms): the fastest point, alone


# --- HTTP, on a real run ---


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    shutil.copytree(flexres.sample_data_dir(), data)
    flexres.train(
        {
            "model": {"name": "resnet18", "width_mult": 0.25},
            "method": {"name": "rsnet", "resolutions": [64, 48]},
            "data": {"root": str(data), "cache": True, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 25, "lr": 0.02, "progress": False, "eval_every": 0},
        },
        root / "run",
        log=lambda s: None,
    )
    flexres.table(root / "run", data, resolutions=[64, 56, 48])
    return root / "run", data


def jpeg(size=(90, 70), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(run_dir):
    app = create_app(run_dir[0], ServeOptions(max_wait_ms=1))
    with TestClient(app) as c:
        yield c


def test_points_are_the_trained_resolutions_and_the_query_tables_pareto_frontier(client, run_dir):
    info = client.get("/points").json()
    rows = flexres.analysis.table.read_table(run_dir[0])
    frontier = {r["resolution"] for r in rows if r["pareto_macs"]}
    assert {p["resolution"] for p in info["points"]} == frontier | {64, 48}
    assert info["source"] == "table" and info["mode"] == "fixed"
    for p in info["points"]:
        row = next(r for r in rows if r["resolution"] == p["resolution"])
        assert p["macs"] == row["macs"] and p["expected_top1"] == row["top1"]
        assert p["why"].startswith("trained") == (p["resolution"] in (64, 48))  # /points says why each is served


def test_a_tie_in_accuracy_never_drops_a_trained_resolution_and_points_can_be_named(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir[0], run)
    table = json.loads((run / TABLE).read_text())
    for r in table["rows"]:
        r["top1"] = 50.0  # every point equally accurate: the frontier keeps only the cheapest
    (run / TABLE).write_text(json.dumps(table))
    served = load_points(run)
    assert {p.resolution for p in served.points} >= {64, 48}
    assert [p.name for p in served.points if p.resolution == 64][0] == "64px"
    named = load_points(run, PointOptions(points=("64px", "56")))
    assert [(p.name, p.why) for p in named.points] == [("56px", "asked for"), ("64px", "asked for")]
    with pytest.raises(ValueError, match=r"no operating point '72px w0.5' to serve; known: "):
        load_points(run, PointOptions(points=("72px w0.5",)))


def test_predict_equals_flexres_predict_for_multipart_and_raw_bodies(client, run_dir):
    run, data = run_dir
    image = sorted((data / "val").rglob("*.JPEG"))[0]
    expected = flexres.predict(run, [image], resolution=48)["predictions"][0]["top"]
    for kwargs in (
        {"files": {"file": ("x.jpg", image.read_bytes(), "image/jpeg")}},
        {"content": image.read_bytes(), "headers": {"content-type": "image/jpeg"}},
    ):
        r = client.post("/predict?resolution=48", **kwargs)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["operating_point"]["resolution"] == 48 and body["operating_point"]["macs"] > 0
        assert [t["label"] for t in body["top"]] == [t["label"] for t in expected]
        for got, want in zip(body["top"], expected):
            assert got["probability"] == pytest.approx(want["probability"], abs=2e-4)
        assert body["latency_ms"] >= body["inference_ms"] > 0 and body["batch_size"] == 1


def test_budgets_pick_the_best_point_that_fits(client):
    points = client.get("/points").json()["points"]
    cheapest = min(points, key=lambda p: p["macs"])
    r = client.post(f"/predict?max_macs={cheapest['macs']}", content=jpeg())
    assert r.status_code == 200 and r.json()["operating_point"]["name"] == cheapest["name"]
    best = client.post("/predict", content=jpeg()).json()[
        "operating_point"
    ]  # fixed mode, no resolution: the best point
    assert best["expected_top1"] == max(p["expected_top1"] for p in points)
    r = client.post("/predict?max_latency_ms=10000&topk=2", content=jpeg())
    assert r.status_code == 200 and len(r.json()["top"]) == 2


@pytest.mark.parametrize(
    "query, body, status, message",
    [
        ("", b"", 400, "empty body"),
        ("", b"this is not an image", 415, "not an image"),
        ("?resolution=100", None, 422, "resolution 100 is not served; served resolutions:"),
        ("?resolution=abc", None, 422, "resolution='abc' is not a number"),
        ("?max_macs=1K", None, 422, "no operating point within 0.0 MMACs: the cheapest"),
        ("?max_latency_ms=0.000001", None, 422, "no operating point answers within 1e-06 ms"),
        ("?max_latency_ms=nan", None, 422, "max_latency_ms='nan' must be a positive, finite number"),
        ("?topk=0", None, 422, "topk='0' must be a positive, finite number"),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_leave_the_server_healthy(client, query, body, status, message):
    r = client.post("/predict" + query, content=jpeg() if body is None else body)
    assert r.status_code == status and message in r.json()["detail"], r.text
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/predict", content=jpeg()).status_code == 200


def test_an_upload_that_is_not_an_image_is_described_in_plain_text(client):
    """The 415 names the upload's first bytes as a person reads them (its text, else hex), not as Python's b'...'."""
    from flexres.serving.images import decode_image

    r = client.post("/predict", content=b"<html><body>502 Bad Gateway")
    assert r.status_code == 415
    assert r.json()["detail"] == "not an image Pillow can read (27 bytes; starts with the text '<html><b')"
    with pytest.raises(RequestError) as binary:
        decode_image(b"\x00\x01\xfe\xffabcdef")
    assert binary.value.status == 415 and "starts with the bytes 00 01 fe ff 61 62 63 64 (hex)" in str(binary.value)
    assert "b'" not in str(binary.value)


def test_oversized_uploads_and_images_get_413(run_dir):
    app = create_app(run_dir[0], max_upload_bytes=2000, max_pixels=100 * 100)
    with TestClient(app) as c:
        r = c.post("/predict", content=b"\xff" * 5000)
        assert r.status_code == 413 and "over the limit of 2000 bytes" in r.json()["detail"]
        r = c.post("/predict", files={"file": ("x.jpg", b"\xff" * 5000, "image/jpeg")})
        assert r.status_code == 413
        buf = io.BytesIO()
        Image.new("RGB", (300, 300)).save(buf, "PNG")  # a flat image compresses to under 2000 bytes
        small_file_many_pixels = buf.getvalue()
        assert len(small_file_many_pixels) < 2000
        r = c.post("/predict", content=small_file_many_pixels)
        assert r.status_code == 413 and "300 x 300" in r.json()["detail"]
        assert c.get("/health").status_code == 200


def test_an_overloaded_server_answers_503_with_retry_after(run_dir):
    points = flexres.serving.load_points(run_dir[0])
    names = [p.name for p in points.points]
    slow = LatencyModel({n: 5000.0 for n in names}, {n: 1.0 for n in names}, learn=False)
    app = create_app(engine=ServingEngine(points, ServeOptions(target_p95_ms=200), latency=slow))
    with TestClient(app) as c:
        r = c.post("/predict", content=jpeg())
        assert r.status_code == 503 and r.headers["retry-after"] == "6" and "cheapest point" in r.json()["detail"]
        assert c.get("/health").json()["status"] == "ok"
        assert 'flexres_rejected_total{reason="over_target"} 1.0' in c.get("/metrics").text


def test_metrics_count_requests_points_and_batches(run_dir):
    with TestClient(create_app(run_dir[0])) as c:
        for _ in range(3):
            assert c.post("/predict?resolution=48", content=jpeg()).status_code == 200
        assert c.post("/predict", content=b"").status_code == 400
        text = c.get("/metrics").text
    assert 'flexres_requests_total{endpoint="predict",status="200"} 3.0' in text
    assert 'flexres_requests_total{endpoint="predict",status="400"} 1.0' in text
    assert 'flexres_operating_point_total{point="48px"} 3.0' in text
    assert "flexres_request_latency_seconds_count 3.0" in text and "flexres_batch_size_count 3.0" in text
    assert "flexres_queue_length 0.0" in text


def test_page_and_side_by_side_endpoint(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text and "/predict/all" in page.text
    example = client.get("/example.jpg")
    assert example.status_code == 200 and example.headers["content-type"] == "image/jpeg"
    body = client.post("/predict/all", files={"file": ("e.jpg", example.content, "image/jpeg")}).json()
    points = client.get("/points").json()["points"]
    assert [r["operating_point"]["name"] for r in body["results"]] == [p["name"] for p in points]
    for r in body["results"]:  # top-5 of 10 classes, most probable first
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0.5 <= sum(probs) <= 1.0 + 1e-3


@pytest.mark.slow
def test_serving_exported_models_gives_the_exported_points(run_dir, tmp_path):
    run, data = run_dir
    files = [flexres.export(run, r, out=tmp_path / f"m{r}.onnx", data=data)["path"] for r in (64, 48)]
    with TestClient(create_app(files)) as c:
        info = c.get("/points").json()
        assert {p["resolution"] for p in info["points"]} == {64, 48} and info["source"] == "exported"
        image = sorted((data / "val").rglob("*.JPEG"))[3]
        got = c.post("/predict?resolution=64", content=image.read_bytes()).json()["top"]
        want = flexres.predict(run, [image], resolution=64)["predictions"][0]["top"]
        assert [t["label"] for t in got] == [t["label"] for t in want]
        assert c.post("/predict?resolution=56", content=image.read_bytes()).status_code == 422


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match="resolution 100 is not among the served points"):
        ServingEngine(synthetic_points(), ServeOptions(resolution=100), latency=synthetic_latency(POINT_NAMES))
    with pytest.raises(ValueError, match="max_batch"):
        ServingEngine(synthetic_points(), ServeOptions(max_batch=0), latency=synthetic_latency(POINT_NAMES))


def test_a_decompression_bomb_is_413_not_500(run_dir, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses images over twice this
    with TestClient(create_app(run_dir[0])) as c:
        r = c.post("/predict", content=jpeg((100, 100)))
        assert r.status_code == 413 and "image too large" in r.json()["detail"]


def test_stop_and_failing_batches_answer_every_waiting_request():
    def failing(x):
        raise RuntimeError("the model broke")

    points = synthetic_points(sleep=True)
    engine = ServingEngine(points, ServeOptions(max_wait_ms=0), latency=synthetic_latency(POINT_NAMES))
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)

    async def scenario():
        await engine.start()
        big = engine.points.named("64px")
        original, big.run = big.run, failing
        with pytest.raises(RuntimeError, match="the model broke"):
            await asyncio.wait_for(engine.submit(image, engine.constrain(resolution=64)), 5)
        big.run = original
        ok = await asyncio.wait_for(engine.submit(image, engine.constrain(resolution=64)), 5)  # the server goes on
        slow = asyncio.ensure_future(engine.submit(image, engine.constrain(resolution=64)))
        await asyncio.sleep(0.005)  # the batch is running (it sleeps 15 ms)
        await engine.stop()
        with pytest.raises(Overloaded, match="shutting down"):
            await asyncio.wait_for(slow, 5)
        return ok

    assert asyncio.run(scenario())["operating_point"]["name"] == "64px"
    assert engine.inflight == 0


def test_an_idle_server_admits_again_after_an_overload_taught_it_a_slowdown():
    """A slowdown learned under overload (correction 20x) predicts every point over target. Busy, the server refuses;
    idle, it admits, serves, and the served batch brings the learned slowdown back down."""
    learned = synthetic_latency(POINT_NAMES)
    learned.learn, learned.correction = True, 20.0
    engine = ServingEngine(synthetic_points(), ServeOptions(target_p95_ms=20), latency=learned)
    assert not engine.controller.admits(0, 0.0, None, 20.0)[0]  # even alone, predicted over target
    engine.inflight = 1
    with pytest.raises(Overloaded):
        engine.admit(engine.constrain())
    engine.inflight = 0

    async def one():
        await engine.start()
        try:
            return await engine.submit(torch.zeros(3, 8, 8, dtype=torch.uint8), engine.constrain())
        finally:
            await engine.stop()

    result = asyncio.run(one())
    assert result["top"][0]["class"] in "abc"
    assert learned.correction < 20.0


def test_the_event_loop_lag_is_measured_and_published_but_refuses_nothing():
    """How late the event loop runs what is due is measured from the loop itself and shown in /metrics. It refuses
    nothing: under a flood it comes from answering refusals and from other processes, which refusing more cannot
    lower, and counting it kept the model from full batches (issue 31; the pacing of refusals bounds it instead)."""
    learned = synthetic_latency(POINT_NAMES)
    learned.learn = True
    engine = ServingEngine(synthetic_points(), ServeOptions(target_p95_ms=50, max_batch=4), latency=learned)
    engine.loop_lag_ms = 100.0
    for _ in range(5):
        engine.admit(engine.constrain())  # the model alone decides: two batches of 4 at "small" take 6 ms
    assert engine.inflight == 5

    async def blocked_loop():
        await engine.start()
        try:
            await asyncio.sleep(0.03)
            time.sleep(0.15)  # a handler hogging the loop, as request parsing does under overload
            await asyncio.sleep(0.03)
            return engine.loop_lag_ms, engine.metrics.render().decode()
        finally:
            await engine.stop()

    lag, metrics = asyncio.run(blocked_loop())
    assert lag >= 100.0
    published = float(
        next(line for line in metrics.splitlines() if line.startswith("flexres_loop_lag_seconds ")).split()[1]
    )
    assert published >= 0.1


@pytest.mark.slow
def test_a_child_process_serves_the_same_predictions_as_the_inference_thread(run_dir):
    """`flexres serve` runs batches in a child process by default (a flood of refusals holds the server's GIL): the
    child loads the same run, and every point's top-k and the latency model's measurements come back from it. When the
    child dies, its batch is answered 503 and a new child serves the next one."""
    from flexres.serving.inference import ProcessInference

    points = load_points(run_dir[0])
    images = [
        pil_to_tensor(Image.open(io.BytesIO(jpeg((90, 70), c))).convert("RGB")) for c in ((200, 30, 30), (20, 160, 90))
    ]
    child = ProcessInference(run_dir[0], threads=1)
    engine = ServingEngine(points, ServeOptions(max_wait_ms=0), inference=child)
    first = child.pid
    assert first is not None and first != os.getpid()  # the latency model was measured in another process

    async def both():
        await engine.start()
        try:
            here, there = {}, {}
            for p in points.points:
                here[p.name] = run_batch(points, p.name, images, [3, 3])[0]
                there[p.name] = (await child.run(p.name, images, [3, 3]))[0]
            served = await engine.submit(images[0], engine.constrain(resolution=points.points[0].resolution), topk=3)
            # encoded requests are decoded in the child; one that does not decode is refused, its batch mates still run
            mixed = (await child.run(points.points[0].name, [b"not an image", jpeg((90, 70), (20, 160, 90))], [3, 3]))[
                0
            ]
            with pytest.raises(RequestError, match="not an image") as refused:
                await engine.submit(b"GIF89a but not really", engine.constrain(), topk=3)
            os.kill(first, signal.SIGKILL)  # as the out-of-memory killer would
            with pytest.raises(Overloaded, match="restarted"):
                await engine.submit(images[0], engine.constrain(), topk=3)
            again = await engine.submit(images[0], engine.constrain(), topk=3)
            assert child.restarts == 1 and child.pid not in (None, first) and again["top"]
            return here, there, served, mixed, refused.value.status
        finally:
            await engine.stop()

    here, there, served, mixed, status = asyncio.run(both())
    assert isinstance(mixed[0], Refused) and mixed[0].status == 415 and status == 415
    assert [c["class"] for c in mixed[1]] == [c["class"] for c in here[points.points[0].name][1]]
    for name in here:
        for a, b in zip(here[name], there[name]):
            assert [c["class"] for c in a] == [c["class"] for c in b]
            assert [c["probability"] for c in a] == pytest.approx([c["probability"] for c in b], abs=2e-4)
    assert [c["class"] for c in served["top"]] == [c["class"] for c in here[points.points[0].name][0]]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux /proc")
def test_closing_the_inference_process_ends_it_and_releases_its_semaphores(run_dir, monkeypatch):
    """close() ends the process even when it hangs (here: stopped, as a process stuck in a batch would be), and returns
    only once every pool it started, a replaced one too, has unlinked the semaphores of its queues. A server that exits
    right after (uvicorn re-raises the SIGTERM it caught) would otherwise leave them to the resource tracker, which
    prints "leaked semaphore objects" as the server stops."""
    from multiprocessing import resource_tracker

    from flexres.serving.inference import ProcessInference

    live: set[str] = set()  # semaphores registered with the tracker by this process and not yet unregistered
    register, unregister = resource_tracker.register, resource_tracker.unregister

    def registered(name: str, rtype: str) -> None:
        if rtype == "semaphore":
            live.add(name)
        register(name, rtype)

    def unregistered(name: str, rtype: str) -> None:
        live.discard(name)
        unregister(name, rtype)

    monkeypatch.setattr(resource_tracker, "register", registered)  # multiprocessing looks them up on every use
    monkeypatch.setattr(resource_tracker, "unregister", unregistered)
    name = load_points(run_dir[0]).points[0].name
    image = pil_to_tensor(Image.open(io.BytesIO(jpeg())).convert("RGB"))
    child = ProcessInference(run_dir[0], threads=1)
    hung = None
    try:
        child.time_batch(name, 1)
        os.kill(child.pid, signal.SIGKILL)  # a replaced pool must be released too
        with pytest.raises(Overloaded, match="restarted"):
            asyncio.run(child.run(name, [image], [3]))
        assert asyncio.run(child.run(name, [image], [3]))[0][0] and child.restarts == 1  # the new process serves
        hung = child.pid
        os.kill(hung, signal.SIGSTOP)
        assert live
        child.close(timeout_s=2.0)
        assert not _alive(hung), "close() left the hung inference process behind"
        assert not live, f"{len(live)} semaphores still linked after close()"
    finally:
        if hung is not None and _alive(hung):
            os.kill(hung, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux /proc")
def test_a_hung_inference_process_is_killed_and_replaced_after_the_batch_timeout(run_dir):
    """A child that stops answering (here: SIGSTOP) would hold its batch and every later one forever: after
    batch_timeout_s the batch is answered 503 and the child is killed. A batch that waited behind it (batches enter
    the process one at a time) is not failed with it: it waits for the new child to load and is served."""
    from flexres.serving.inference import ProcessInference

    points = load_points(run_dir[0])
    name = points.points[0].name
    image = pil_to_tensor(Image.open(io.BytesIO(jpeg((90, 70), (200, 30, 30)))).convert("RGB"))
    child = ProcessInference(run_dir[0], threads=1, batch_timeout_s=5.0)
    hung = None
    try:
        child.time_batch(name, 1)  # started and loaded
        hung = child.pid
        os.kill(hung, signal.SIGSTOP)

        async def two_batches():
            return await asyncio.gather(
                child.run(name, [image], [3]), child.run(name, [image], [3]), return_exceptions=True
            )

        first, second = asyncio.run(asyncio.wait_for(two_batches(), 120))  # a hang fails here, not forever
        assert isinstance(first, Overloaded) and "did not answer within 5 s and was restarted" in str(first)
        assert not isinstance(second, BaseException), second
        assert [c["class"] for c in second[0][0]] == [c["class"] for c in run_batch(points, name, [image], [3])[0][0]]
        deadline = time.monotonic() + 30
        while _alive(hung) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(hung) and child.restarts == 1 and child.pid not in (None, hung)
    finally:
        if hung is not None and _alive(hung):
            os.kill(hung, signal.SIGKILL)  # a stopped process ignores the SIGTERM of close() until it is continued
        child.close()
    with pytest.raises(ValueError, match="batch_timeout_s must be > 0"):
        ProcessInference(run_dir[0], batch_timeout_s=0)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from Linux /proc")
def test_flexres_serve_predicts_over_http_and_its_inference_process_ends_with_it(run_dir, tmp_path):
    """A real `flexres serve` on 127.0.0.1 (batches in its child process) answers /health and /predict; killed with
    SIGKILL, which runs no clean-up, it leaves no inference process behind."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "flexres.cli", "serve", str(run_dir[0]), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline, "the server did not come up in 120 s"
                time.sleep(0.3)
        r = httpx.post(f"{url}/predict", content=jpeg(), headers={"content-type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200 and len(r.json()["top"]) == 5
        bad = httpx.post(f"{url}/predict", content=b"hello", headers={"content-type": "image/jpeg"}, timeout=30)
        assert bad.status_code == 415 and "not an image" in bad.json()["detail"]
        assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
        workers = [k for k in _children(server.pid) if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()]
        assert len(workers) == 1
    finally:
        server.kill()
        server.wait()
        log.close()
    deadline = time.time() + 10
    while _alive(workers[0]) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(workers[0]), "the inference process outlived its server"


def test_an_upload_that_fails_to_decode_in_any_way_fails_alone():
    """Whatever the decoder raises on one upload (not only the 4xx it knows) refuses that upload; its batch mates run,
    and the decoding time is reported apart from the model's."""
    from flexres.serving.inference import ThreadInference

    def decode(data: bytes) -> torch.Tensor:
        if data == b"odd":
            raise ValueError("a plugin error")
        if data == b"slow":
            time.sleep(0.02)
        return torch.zeros(3, 8, 8, dtype=torch.uint8)

    results, _, decode_ms = asyncio.run(
        ThreadInference(synthetic_points()).run("64px", [b"odd", b"slow"], [2, 2], decode)
    )
    assert isinstance(results[0], Refused) and results[0].status == 415
    assert results[0].message == "cannot decode the image: a plugin error"  # plain text, not the exception's repr
    assert results[1][0]["class"] == "a" and len(results[1]) == 2  # the synthetic 64 px point always says "a"
    assert decode_ms >= 20.0  # the 20 ms decode is counted as decoding (a lower bound, not a speed claim)


def test_the_ort_backend_answers_as_the_torch_backend_at_every_point(run_dir, tmp_path):
    run, data = run_dir
    images = [pil_to_tensor(Image.open(f).convert("RGB")) for f in sorted((data / "val").rglob("*.JPEG"))[:6]]
    torch_points = load_points(run, PointOptions(backend="torch"))
    ort_points = load_points(run, PointOptions(backend="ort", threads=1))
    assert [p.name for p in ort_points.points] == [p.name for p in torch_points.points]
    assert all(p.backend == "ort" for p in ort_points.points) and (run / "serving").is_dir()
    for p in torch_points.points:
        want, _, _ = run_batch(torch_points, p.name, images, [3] * len(images))
        got, _, _ = run_batch(ort_points, p.name, images, [3] * len(images))
        for g, w in zip(got, want):
            assert [t["label"] for t in g] == [t["label"] for t in w]
            assert [t["probability"] for t in g] == pytest.approx([t["probability"] for t in w], abs=1e-4)


def test_int8_export_calibrates_on_training_images_and_keeps_most_top1(run_dir, tmp_path):
    run, data = run_dir
    info = flexres.export(run, 64, out=tmp_path / "m64_int8.onnx", data=data, int8=True)
    assert info["int8"] and info["int8_calibration"].startswith("64 px")
    assert info["files"] == ["m64_int8.onnx"]  # one self-contained file
    assert info["int8_top1_agreement"] >= 0.5
    fp32 = flexres.export(run, 64, out=tmp_path / "m64.onnx", data=data)
    assert (tmp_path / "m64_int8.onnx").stat().st_size < 0.5 * (tmp_path / fp32["file"]).stat().st_size  # int8 weights
    served = load_points([tmp_path / "m64_int8.onnx"])
    assert served.points[0].backend == "ort-int8"


@pytest.mark.slow
def test_a_calibration_shared_by_resolutions_is_the_union_of_their_ranges(run_dir, tmp_path):
    from onnxruntime.quantization.calibrate import load_tensors_data

    from flexres.deploy.runtime import merge_ranges

    run, data = run_dir
    own = {r: tmp_path / f"ranges{r}.json" for r in (48, 64)}
    for r, ranges in own.items():  # per resolution: calibrated at r, its ranges written
        info = flexres.export(run, r, out=tmp_path / f"m{r}_int8.onnx", data=data, int8=True, int8_ranges=ranges)
        assert info["int8_calibration"].startswith(f"{r} px") and ranges.is_file()
    shared = merge_ranges(list(own.values()), tmp_path / "shared.json")
    per_res = {r: load_tensors_data(f).data for r, f in own.items()}
    merged = load_tensors_data(shared).data
    assert set(merged) == set(per_res[48]) and len(merged) > 10
    differ = 0
    for name, t in merged.items():
        lows, highs = [per_res[r][name].range_value[0] for r in own], [per_res[r][name].range_value[1] for r in own]
        np.testing.assert_array_equal(t.range_value[0], np.stack(lows).min(0))
        np.testing.assert_array_equal(t.range_value[1], np.stack(highs).max(0))
        differ += not (np.array_equal(lows[0], lows[1]) and np.array_equal(highs[0], highs[1]))
    assert differ > len(merged) // 2  # the two resolutions do see different activations
    info = flexres.export(run, 64, out=tmp_path / "m64_shared.onnx", data=data, int8=True, int8_ranges=shared)
    assert info["int8_calibration"] == "ranges from shared.json" and info["int8_top1_agreement"] >= 0.5


def test_an_onnx_model_moved_without_its_data_file_is_refused_naming_it(run_dir, tmp_path):
    import onnx

    from flexres.deploy.runtime import onnx_session
    from flexres.errors import MissingFileError

    info = flexres.export(run_dir[0], 48, out=tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.save(model, str(tmp_path / "big.onnx"), save_as_external_data=True, location="big.onnx.data")
    assert onnx_session(tmp_path / "big.onnx") is not None and info["files"] == ["m.onnx"]
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "big.onnx").rename(moved / "big.onnx")
    with pytest.raises(MissingFileError, match=r"keeps its weights in big\.onnx\.data, which is not beside it"):
        onnx_session(moved / "big.onnx")
