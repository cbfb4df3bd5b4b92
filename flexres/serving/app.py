"""The HTTP face of the serving engine (FastAPI on uvicorn): /predict, /predict/all, /health, /points, /metrics, /."""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from torch import Tensor

from ..data import sample_data_dir
from ..deploy.predict import parse_count
from .engine import Overloaded, ServeOptions, ServingEngine
from .images import MAX_PIXELS, MAX_UPLOAD_BYTES, RequestError, decode_image
from .points import load_points


async def read_image_bytes(request: Request, limit: int) -> bytes:
    """The multipart field ``file``, or the raw body; 413 past ``limit`` bytes without reading the rest."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + 2**16:  # multipart framing adds a few hundred bytes
        raise RequestError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        if not length:  # the form parser would store the whole upload before its size could be checked
            raise RequestError(411, "a multipart upload needs a Content-Length header (or send the raw image bytes)")
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "multipart body without a file field named 'file'")
        data = await upload.read(limit + 1)
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        data = b"".join(chunks)
    if len(data) > limit:
        raise RequestError(413, f"image of {len(data)} bytes is over the limit of {limit} bytes")
    return data


def _example_image() -> Path | None:
    val = sample_data_dir() / "val"
    return next(iter(sorted(val.rglob("*.JPEG"))), None) if val.is_dir() else None


def create_app(
    targets: str | Path | Sequence[str | Path] | None = None,
    options: ServeOptions | None = None,
    *,
    engine: ServingEngine | None = None,
    bn_policy: str | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> FastAPI:
    """An ASGI app serving ``targets`` (a run, or exported model files), or a ready ``engine``."""
    if engine is None:
        engine = ServingEngine(load_points(targets, bn_policy), options)
    metrics = engine.metrics
    decode_short_side = max(round(p.resolution / p.crop_fraction) for p in engine.points.points)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        # What is alive now (torch, the model, the web stack: hundreds of thousands of objects) lives as long as the
        # server: out of the collector's sight, a full collection under a flood of requests takes milliseconds instead
        # of the 100-400 ms that stalled every admitted request (measured on 2 busy cores).
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await engine.stop()

    app = FastAPI(title="flexres serve", summary=engine.points.description, lifespan=lifespan)
    app.state.engine = engine

    def error(endpoint: str, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    async def overloaded(endpoint: str, e: Overloaded, start: float) -> JSONResponse:
        """A 503, held as long as admission said (a refusal's turn under a flood: see RefusalPacer)."""
        if e.delay_s > 0:
            await asyncio.sleep(e.delay_s)
        metrics.refusal_latency.observe(time.perf_counter() - start)
        return error(endpoint, 503, str(e), {"Retry-After": str(e.retry_after)})

    def number(request: Request, key: str, parse) -> float | None:
        """A positive, finite number from the query string, or None when absent; 422 naming the parameter otherwise."""
        raw = request.query_params.get(key)
        if raw is None or raw == "":
            return None
        try:
            value = parse(raw)
        except ValueError:
            raise RequestError(422, f"{key}={raw!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise RequestError(422, f"{key}={raw!r} must be a positive, finite number")
        return value

    engine.decode = partial(decode_image, max_pixels=max_pixels, shortest=decode_short_side)

    async def image_from(request: Request, decode_here: bool = False) -> Tensor | bytes:
        data = await read_image_bytes(request, max_upload_bytes)
        if engine.inference.decodes and not decode_here:  # in the inference process, off this process's GIL
            return data
        start = time.perf_counter()
        image = await run_in_threadpool(engine.decode, data)
        engine.observe_decode((time.perf_counter() - start) * 1000)
        return image

    @app.post("/predict")
    async def predict(request: Request):
        """Top-k of one image at the operating point chosen for it. Query: resolution, max_macs (e.g. 20M),
        max_latency_ms, topk. Body: the multipart field 'file' or the raw image bytes."""
        start = time.perf_counter()
        try:
            res = number(request, "resolution", int)
            topk = int(number(request, "topk", int) or engine.options.topk)
            constraint = engine.constrain(
                res, number(request, "max_macs", parse_count), number(request, "max_latency_ms", float)
            )
            arrival = engine.admit(constraint)  # before the body is read: a refusal costs its headers, no more
        except RequestError as e:
            return error("predict", e.status, str(e))
        except Overloaded as e:
            return await overloaded("predict", e, start)
        answered = False
        try:
            image = await image_from(request)
            out = await engine.submit(image, constraint, topk, arrival)
            answered = True
        except RequestError as e:
            return error("predict", e.status, str(e))
        except Overloaded as e:
            return await overloaded("predict", e, start)
        except Exception as e:  # noqa: BLE001 - a failed batch: answered, counted, and the server goes on
            return error("predict", 500, f"inference failed: {e}")
        finally:
            engine.finish(arrival, answered)
        metrics.requests.labels("predict", "200").inc()
        metrics.latency.observe(time.perf_counter() - start)
        return out

    @app.post("/predict/all")
    async def predict_all(request: Request):
        """The image at every served point, most accurate first (what the page at / shows side by side); admitted
        like /predict, since it takes the inference worker once per point. Decoded here, once, not once per point."""
        start = time.perf_counter()
        try:
            arrival = engine.admit(engine.constrain())
        except Overloaded as e:
            return await overloaded("predict_all", e, start)
        try:
            image = await image_from(request, decode_here=True)
            results = await engine.run_every_point(image)
        except RequestError as e:
            return error("predict_all", e.status, str(e))
        except Overloaded as e:
            return await overloaded("predict_all", e, start)
        except Exception as e:  # noqa: BLE001
            return error("predict_all", 500, f"inference failed: {e}")
        finally:
            engine.finish(arrival, False)
        metrics.requests.labels("predict_all", "200").inc()
        return {"model": engine.points.description, "results": results}

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "mode": engine.mode,
            "queue": len(engine.queue),
            "in_flight": engine.inflight,
            "points": len(engine.points.points),
            "model": engine.points.description,
            "inference": "process" if engine.inference.decodes else "thread",
            "inference_restarts": engine.inference.restarts,
        }

    @app.get("/points")
    async def points():
        return engine.describe()

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/example.jpg")
    async def example():
        path = _example_image()
        return (
            FileResponse(path, media_type="image/jpeg")
            if path
            else error("example", 404, "no sample image in this install")
        )

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("flexres.serving").joinpath("page.html").read_text(encoding="utf-8")

    return app
