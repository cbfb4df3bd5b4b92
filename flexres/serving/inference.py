"""Where the server's batches run: on one thread of the server's own process, or in a child process of their own.

The child process exists for floods. When clients re-send every refused request at once, the event loop spends all its
time answering 503s, in Python, holding this process's GIL; an inference thread that needs the GIL between every op
then runs a 7 ms batch in about 58 ms (measured, BENCHMARKS.md section 10), the learned slowdown predicts every point
over target, and nearly nothing is served. A child process has its own interpreter and gets its share of the CPU from
the operating system: a forward in another process ran at its idle speed through the same flood.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..analysis.latency import time_call
from ..data import EvalTransform, normalize_batch
from ..deploy.predict import top_classes
from .images import Refused, RequestError, decode_image
from .points import PointSet, load_points

Results = tuple[list[list[dict[str, Any]] | Refused], float]
Decode = Callable[[bytes], Tensor]


def run_batch(points: PointSet, name: str, items: list[Tensor | bytes], topk: list[int], decode: Decode = decode_image) -> Results:
    """Decode what is still encoded, preprocess (resize and crop to the point's resolution), run and rank one batch;
    and its time in ms, measured here, so time spent waiting to start never counts as the model's. An item that does
    not decode gets its Refused (400 / 413 / 415) in place of a top-k; the others still run."""
    start = time.perf_counter()
    p = points.named(name)
    images, refused = [], {}
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = decode(item)
            except RequestError as e:
                refused[i] = Refused.of(e)
                continue
        images.append(item)
    tops = []
    if images:
        tf = EvalTransform(p.resolution, p.crop_fraction)
        x = normalize_batch(torch.stack([tf(im) for im in images]), p.mean, p.std)
        probs = torch.softmax(p.run(x).float(), dim=1)
        ks = [k for i, k in enumerate(topk) if i not in refused]
        tops = [top_classes(pr, points.classes, points.names, k) for pr, k in zip(probs, ks)]
    ranked = iter(tops)
    return [refused[i] if i in refused else next(ranked) for i in range(len(items))], (time.perf_counter() - start) * 1000.0


def time_batch(points: PointSet, name: str, batch: int) -> float:
    """Median ms of the model alone on a ``batch`` of random inputs at point ``name`` (for the latency model)."""
    p = points.named(name)
    x = torch.randn(batch, 3, p.resolution, p.resolution)
    return time_call(lambda: p.run(x), warmup=2, repeats=5)


class ThreadInference:
    """Batches run on one thread of this process, one at a time (one model, one forward). Requests arrive decoded
    (the server decodes them on its thread pool, while the model runs)."""

    decodes = False

    def __init__(self, points: PointSet) -> None:
        self.points = points
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flexres-infer")

    def time_batch(self, name: str, batch: int) -> float:
        return time_batch(self.points, name, batch)

    async def run(self, name: str, items: list[Tensor | bytes], topk: list[int], decode: Decode = decode_image) -> Results:
        return await asyncio.get_running_loop().run_in_executor(self._pool, run_batch, self.points, name, items, topk, decode)

    def close(self) -> None:
        self._pool.shutdown(wait=False)  # a forward still running finishes on its thread; nobody waits for it


_child_points: PointSet | None = None  # the points loaded in the child process by _load_in_child


def _exit_with(parent: int) -> None:
    """End the child once its server is gone, however the server ended (a SIGKILL runs no clean-up)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _load_in_child(targets: list[str], bn_policy: str | None, threads: int, parent: int) -> None:
    global _child_points
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="flexres-parent-watch").start()
    torch.set_num_threads(threads)
    _child_points = load_points(targets, bn_policy)


def _run_in_child(name: str, items: list[np.ndarray | bytes], topk: list[int], decode: Decode) -> Results:
    items = [im if isinstance(im, bytes) else torch.from_numpy(im) for im in items]
    return run_batch(_child_points, name, items, topk, decode)


def _time_in_child(name: str, batch: int) -> float:
    return time_batch(_child_points, name, batch)


class ProcessInference:
    """Batches run in one child process that loads the same targets (so the model is in memory twice: the server's
    copy only describes the points). Requests travel as their encoded bytes and are decoded in the child, off the
    server's GIL too (decoded images, if given, as uint8 arrays); results come back as the small top-k lists."""

    decodes = True

    def __init__(self, targets: str | Path | list[str | Path], bn_policy: str | None = None, threads: int | None = None) -> None:
        targets = [str(t) for t in ([targets] if isinstance(targets, (str, Path)) else targets)]
        # spawn, not fork: a forked child would inherit the parent's torch thread pools and locks mid-state
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_load_in_child,
                                         initargs=(targets, bn_policy, threads or torch.get_num_threads(), os.getpid()))

    def time_batch(self, name: str, batch: int) -> float:
        return self._pool.submit(_time_in_child, name, batch).result()

    async def run(self, name: str, items: list[Tensor | bytes], topk: list[int], decode: Decode = decode_image) -> Results:
        items = [im if isinstance(im, bytes) else im.numpy() for im in items]
        return await asyncio.wrap_future(self._pool.submit(_run_in_child, name, items, topk, decode))

    def close(self) -> None:
        # waits for the batch now running (milliseconds) and the child's exit: without waiting, a server that exits
        # right after closing leaves the child behind
        self._pool.shutdown(wait=True, cancel_futures=True)
