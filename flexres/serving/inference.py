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
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..analysis.latency import time_call
from ..data import EvalTransform, normalize_batch
from ..deploy.predict import top_classes
from .errors import Overloaded, Refused, RequestError
from .images import decode_image
from .points import PointOptions, PointSet, load_points

STARTUP_TIMEOUT_S = 300.0  # a restarted inference process's spawn, imports and model load, before its first batch
Results = tuple[list[list[dict[str, Any]] | Refused], float, float]  # per item: top-k or refusal; model ms; decoding ms
Decode = Callable[[bytes], Tensor]


def run_batch(
    points: PointSet, name: str, items: list[Tensor | bytes], topk: list[int], decode: Decode = decode_image
) -> Results:
    """Decode what is still encoded, preprocess (resize and crop to the point's resolution), run and rank one batch.
    Returns the results, the batch's time in ms without decoding (what the latency model learns from: one huge upload
    must not teach it that the model slowed down) and the decoding time; both measured here, so waiting to start never
    counts. An item that does not decode gets its Refused (4xx) in place of a top-k; the others still run."""
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
            except Exception as e:  # noqa: BLE001 - whatever Pillow raises on one upload fails that upload only
                refused[i] = Refused(415, f"cannot decode the image: {str(e) or type(e).__name__}")
                continue
        images.append(item)
    decode_ms = (time.perf_counter() - start) * 1000.0
    tops = []
    if images:
        tf = EvalTransform(p.resolution, p.crop_fraction, p.interpolation)
        x = normalize_batch(torch.stack([tf(im) for im in images]), p.mean, p.std)
        probs = torch.softmax(p.run(x).float(), dim=1)
        ks = [k for i, k in enumerate(topk) if i not in refused]
        tops = [top_classes(pr, points.classes, points.names, k) for pr, k in zip(probs, ks)]
    ranked = iter(tops)
    results = [refused[i] if i in refused else next(ranked) for i in range(len(items))]
    return results, (time.perf_counter() - start) * 1000.0 - decode_ms, decode_ms


def time_batch(points: PointSet, name: str, batch: int) -> float:
    """Median ms of the model alone on a ``batch`` of random inputs at point ``name`` (for the latency model)."""
    p = points.named(name)
    x = torch.randn(batch, 3, p.resolution, p.resolution)
    return time_call(lambda: p.run(x), warmup=2, repeats=5)


class ThreadInference:
    """Batches run on one thread of this process, one at a time (one model, one forward). Requests arrive decoded
    (the server decodes them on its thread pool, while the model runs)."""

    decodes = False
    restarts = 0  # a thread is never replaced

    def __init__(self, points: PointSet) -> None:
        self.points = points
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flexres-infer")

    def time_batch(self, name: str, batch: int) -> float:
        return time_batch(self.points, name, batch)

    async def run(
        self, name: str, items: list[Tensor | bytes], topk: list[int], decode: Decode = decode_image
    ) -> Results:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, run_batch, self.points, name, items, topk, decode
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False)  # a forward still running finishes on its thread; nobody waits for it


_child_points: PointSet | None = None  # the points loaded in the child process by _load_in_child


def _exit_with(parent: int) -> None:
    """End the child once its server is gone, however the server ended (a SIGKILL runs no clean-up)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _load_in_child(targets: list[str], options: PointOptions | str | None, threads: int, parent: int) -> None:
    global _child_points
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="flexres-parent-watch").start()
    torch.set_num_threads(threads)
    _child_points = load_points(targets, options)


def _run_in_child(name: str, items: list[np.ndarray | bytes], topk: list[int], decode: Decode) -> Results:
    items = [im if isinstance(im, bytes) else torch.from_numpy(im) for im in items]
    try:
        return run_batch(_child_points, name, items, topk, decode)
    except Exception as e:  # noqa: BLE001 - an exception class that does not unpickle would break the pool for good
        raise RuntimeError(f"inference failed in the inference process: {e!r}") from None


def _time_in_child(name: str, batch: int) -> float:
    return time_batch(_child_points, name, batch)


def _loaded_in_child() -> bool:
    return _child_points is not None


def _processes(pool: ProcessPoolExecutor) -> list[multiprocessing.Process]:
    """The pool's worker processes (none before its first task); the executor has no public accessor for them."""
    return list((getattr(pool, "_processes", None) or {}).values())


def _shut_down(pool: ProcessPoolExecutor) -> threading.Thread:
    """``pool.shutdown(wait=True)`` on a thread of its own, so that nobody blocks on it yet anybody can wait for it:
    once it returns, the pool has released its queues, and with them their semaphores (see
    ``ProcessInference.close``)."""
    stopper = threading.Thread(
        target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True, name="flexres-infer-stop"
    )
    stopper.start()
    return stopper


class ProcessInference:
    """Batches run in one child process that loads the same targets (so the model is in memory twice: the server's
    copy only describes the points). Requests travel as their encoded bytes and are decoded in the child, off the
    server's GIL too (decoded images, if given, as uint8 arrays); results come back as the small top-k lists."""

    decodes = True

    def __init__(
        self,
        targets: str | Path | list[str | Path],
        options: PointOptions | str | None = None,
        threads: int | None = None,
        batch_timeout_s: float = 30.0,
    ) -> None:
        if not batch_timeout_s > 0:
            raise ValueError(f"batch_timeout_s must be > 0, got {batch_timeout_s}")
        targets = [str(t) for t in ([targets] if isinstance(targets, (str, Path)) else targets)]
        self._initargs = (targets, options, threads or torch.get_num_threads(), os.getpid())
        self.batch_timeout_s = batch_timeout_s
        self.restarts = 0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._starting: Future | None = None  # a restarted process, loading its model
        self._stopping: list[threading.Thread] = []  # shutting down the pools of replaced processes
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: a forked child would inherit the parent's torch thread pools and locks mid-state
        return ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_load_in_child, initargs=self._initargs
        )

    def time_batch(self, name: str, batch: int) -> float:
        try:
            return self._pool.submit(_time_in_child, name, batch).result()
        except BrokenExecutor:
            raise RuntimeError(
                "the inference process failed to start (its error is printed above). A script that calls "
                'flexres.api.serve() needs `if __name__ == "__main__":` around it, since the process '
                're-imports the script; or pass inference="thread"'
            ) from None

    @property
    def pid(self) -> int | None:
        """The inference process's pid, once it runs."""
        procs = _processes(self._pool)
        return procs[0].pid if procs else None

    def _batch_lock(self) -> asyncio.Lock:
        loop = (
            asyncio.get_running_loop()
        )  # a lock belongs to one event loop; a new loop (a new asyncio.run) gets its own
        if self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def run(
        self, name: str, items: list[Tensor | bytes], topk: list[int], decode: Decode = decode_image
    ) -> Results:
        items = [im if isinstance(im, bytes) else im.numpy() for im in items]
        # One batch in the process at a time (/predict/all runs beside the queue's batches): the timeout then measures
        # this batch alone, not the batches queued before it, and a restart leaves no other batch behind in the pool.
        async with self._batch_lock():
            pool, phase = self._pool, "load its model"
            try:
                if (
                    self._starting is not None
                ):  # a restarted process loads the model first: not part of the batch's time
                    await asyncio.wait_for(asyncio.wrap_future(self._starting), STARTUP_TIMEOUT_S)
                    self._starting = None
                phase = "answer"
                return await asyncio.wait_for(
                    asyncio.wrap_future(pool.submit(_run_in_child, name, items, topk, decode)), self.batch_timeout_s
                )
            except asyncio.TimeoutError:  # noqa: UP041 - a different class on Python 3.10
                # Hung (deadlocked, stopped, swapping): this batch and every later one would wait forever.
                self._replace(pool)
                limit = self.batch_timeout_s if phase == "answer" else STARTUP_TIMEOUT_S
                raise Overloaded(
                    f"the inference process did not {phase} within {limit:g} s and was restarted; retry", 1
                ) from None
            except BrokenExecutor:
                # The process died (killed, out of memory). Its batch is answered 503 and a new process takes the next
                # one, instead of every later request failing with the broken pool.
                self._replace(pool)
                raise Overloaded("the inference process stopped and was restarted; retry", 1) from None

    def _replace(self, pool: ProcessPoolExecutor) -> None:
        """Kill the process (a hung one would not end by itself) and start a new one at once, so that it loads the
        model while the next request is on its way."""
        if pool is not self._pool:
            return
        for proc in _processes(pool):
            proc.kill()
        self._stopping = [t for t in self._stopping if t.is_alive()] + [_shut_down(pool)]
        self.restarts += 1
        self._pool = self._start()
        self._starting = self._pool.submit(_loaded_in_child)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the process, waiting at most ``timeout_s`` for a batch still running (a hung process is killed), and
        return only once every pool started here has released its queues. Their semaphores are unlinked then, not when
        the process has merely ended: a server that exits in between (uvicorn re-raises the SIGTERM it caught, which
        ends the process at once) leaves them to multiprocessing's resource tracker, which warns of leaked
        semaphores."""
        procs = _processes(self._pool)
        stopper = _shut_down(self._pool)
        stopper.join(timeout_s)
        if stopper.is_alive():  # a batch still running, or a hung process: it would hold the shutdown for ever
            for proc in procs:
                proc.kill()
        for thread in [*self._stopping, stopper]:
            thread.join(timeout_s)
        self._stopping.clear()
