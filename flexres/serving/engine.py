"""The serving engine: admits requests, batches the ones that can share an operating point, picks that point
(fixed, per-request budget, or adaptive to a latency target) and runs the batch on one inference thread or in a child
process (`inference.py`)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from torch import Tensor

from .controller import AdaptiveController, LatencyModel, RefusalPacer, retry_after_s
from .errors import Overloaded, Refused, RequestError
from .images import decode_image
from .inference import ProcessInference, ThreadInference
from .metrics import ServeMetrics
from .points import PointSet, ServingPoint


@dataclass
class ServeOptions:
    target_p95_ms: float | None = None  # adaptive mode when set
    resolution: int | None = None  # fixed mode: the point used when a request names none (default: the best)
    max_batch: int = 8
    max_wait_ms: float = 2.0  # how long the oldest request may wait for a batch to fill
    max_queue: int = 256
    headroom: float = 0.8
    topk: int = 5
    # 503s answered per second before refusals wait their turn (RefusalPacer): what a flood of clients that re-send at
    # once may cost the server. None: answered at once, however many.
    max_refusals_per_s: float | None = 1000.0


@dataclass
class Constraint:
    """What one request allows: a subset of the points (None: any) and its own latency budget, if any."""

    allowed: list[str] | None = None
    target_ms: float | None = None


@dataclass
class Pending:
    image: Tensor | bytes  # bytes: decoded by the inference worker
    constraint: Constraint
    topk: int
    arrival_ms: float
    future: asyncio.Future = field(repr=False)


def _now_ms() -> float:
    return time.perf_counter() * 1000.0


class ServingEngine:
    def __init__(
        self,
        points: PointSet,
        options: ServeOptions | None = None,
        latency: LatencyModel | None = None,
        metrics: ServeMetrics | None = None,
        clock: Callable[[], float] = _now_ms,
        inference: ThreadInference | ProcessInference | None = None,
    ) -> None:
        self.points = points
        self.options = options or ServeOptions()
        o = self.options
        if o.max_batch < 1 or o.max_queue < 1 or o.max_wait_ms < 0:
            raise ValueError(
                f"max_batch and max_queue must be >= 1 and max_wait_ms >= 0, "
                f"got {o.max_batch}, {o.max_queue}, {o.max_wait_ms}"
            )
        if o.target_p95_ms is not None and o.target_p95_ms <= 0:
            raise ValueError(f"target_p95_ms must be positive, got {o.target_p95_ms}")
        if o.max_refusals_per_s is not None and not o.max_refusals_per_s > 0:
            raise ValueError(f"max_refusals_per_s must be positive (or None: unpaced), got {o.max_refusals_per_s}")
        if o.resolution is not None and o.resolution not in points.resolutions:
            raise ValueError(f"resolution {o.resolution} is not among the served points ({self._served()})")
        self.metrics = metrics or ServeMetrics()
        self.clock = clock
        self.inference = inference or ThreadInference(points)
        self.decode = decode_image  # how the inference worker decodes uploads; the app binds its limits
        self.latency = latency or LatencyModel.measure(
            [p.name for p in points.points], self.inference.time_batch, o.max_batch
        )
        self.controller = AdaptiveController(
            [p.name for p in points.by_preference()],
            self.latency,
            o.target_p95_ms if o.target_p95_ms is not None else math.inf,
            o.max_batch,
            o.headroom,
        )
        self.pacer = RefusalPacer(o.max_refusals_per_s)
        # Admission never refuses while fewer than ``floor`` requests are in flight: one batch running and the next
        # filling, of the largest size the cheapest point serves twice within the target as measured at start-up (at
        # least one request: an idle server always admits, since refusing cannot lower anyone's latency and a learned
        # slowdown only changes when a batch is served). Below that, refusing only makes the batches smaller, and a
        # slowdown learned from small batches (costs per batch that the start-up measurement did not see, multiplied
        # by the batch size) would predict full batches too slow and keep them small: the collapse under a flood.
        fastest = min(self.controller.preference, key=lambda p: self.latency.batch_ms(p, o.max_batch))
        fits = [
            b
            for b in range(1, o.max_batch + 1)
            if o.target_p95_ms is not None and 2 * self.latency.batch_ms(fastest, b) <= o.target_p95_ms
        ]
        self.floor = 2 * max(fits) if fits else 1
        self.queue: deque[Pending] = deque()
        self.inflight = 0  # admitted and not yet answered: reading, decoding, queued or running
        self.overhead_ms = 0.0  # moving average of one upload's decoding time (observe_decode)
        self.recent_ms: deque[float] = deque(maxlen=64)  # latencies of the last answered requests, for feedback
        self._busy_until_ms = 0.0
        self._running = 0  # requests in the batch now running
        self._current: list[Pending] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._lag_watch: asyncio.Task | None = None
        # How late the event loop runs what is due (a decaying maximum), for /metrics. Admission does not count it:
        # under a flood it comes from answering refusals and from other processes, which refusing more cannot lower,
        # and counting it kept the model from full batches (issue 31); the pacing of refusals is what bounds it.
        self.loop_lag_ms = 0.0

    # --- set-up ---
    def _served(self) -> str:
        return ", ".join(str(r) for r in self.points.resolutions)

    @property
    def mode(self) -> str:
        return "adaptive" if self.options.target_p95_ms is not None else "fixed"

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {
            "model": self.points.description,
            "source": self.points.source,
            "mode": self.mode,
            "target_p95_ms": o.target_p95_ms,
            "default_resolution": o.resolution,
            "max_batch": o.max_batch,
            "max_wait_ms": o.max_wait_ms,
            "max_queue": o.max_queue,
            "points": [
                {**p.describe(), "latency_ms_batch1": round(self.latency.batch_ms(p.name, 1), 3)}
                for p in self.points.by_preference()
            ],
        }

    # --- requests ---
    def constrain(
        self, resolution: int | None = None, max_macs: float | None = None, max_latency_ms: float | None = None
    ) -> Constraint:
        """The points a request may use, or a RequestError (422) naming why none can serve it."""
        pts = self.points.points
        if resolution is not None:
            pts = [p for p in pts if p.resolution == resolution]
            if not pts:
                raise RequestError(422, f"resolution {resolution} is not served; served resolutions: {self._served()}")
        elif self.options.resolution is not None and max_macs is None and max_latency_ms is None:
            pts = [p for p in pts if p.resolution == self.options.resolution]
        if max_macs is not None:
            fits = [p for p in pts if p.macs <= max_macs]
            if not fits:
                cheapest = min(pts, key=lambda p: p.macs)
                raise RequestError(
                    422,
                    f"no operating point within {max_macs / 1e6:.1f} MMACs: the cheapest, {cheapest.name}, "
                    f"costs {cheapest.macs / 1e6:.1f} MMACs",
                )
            pts = fits
        if max_latency_ms is not None:
            if max_latency_ms <= 0:
                raise RequestError(422, f"max_latency_ms must be positive, got {max_latency_ms:g}")
            fastest = min(pts, key=lambda p: self.latency.batch_ms(p.name, 1))
            if self.latency.batch_ms(fastest.name, 1) > max_latency_ms:
                raise RequestError(
                    422,
                    f"no operating point answers within {max_latency_ms:g} ms: the fastest, {fastest.name}, "
                    f"takes {self.latency.batch_ms(fastest.name, 1):.2f} ms on an idle server",
                )
        allowed = None if len(pts) == len(self.points.points) else [p.name for p in pts]
        target = max_latency_ms if max_latency_ms is not None else self.options.target_p95_ms
        return Constraint(allowed, target)

    def admit(self, constraint: Constraint) -> float:
        """Accept a request or raise Overloaded; returns its arrival time. Every admitted request must be closed with
        ``finish``. The one place that decides admission, called before the request's body is read or decoded, so a
        refusal costs no more than its headers; the Overloaded says how long to hold the 503 (``RefusalPacer``)."""
        now = self.clock()
        o = self.options
        busy = max(self._busy_until_ms - now, 0.0)
        if self.inflight >= o.max_queue:
            self._refuse(
                now,
                "queue_full",
                f"the queue is full ({o.max_queue} requests)",
                busy + self.latency.drain_ms(self.controller.preference[-1], self.inflight, o.max_batch),
            )
        # Below ``floor`` requests in flight a learned model never refuses (a model given as fixed is trusted from the
        # first request).
        floor = self.floor if self.latency.learn else 0
        if constraint.target_ms is not None and self.inflight >= floor:
            ahead = max(self.inflight - self._running, 0)  # the running batch is in busy
            ok, predicted = self.controller.admits(
                ahead, busy, constraint.allowed, constraint.target_ms, self.overhead_ms
            )
            if not ok:
                self._refuse(
                    now,
                    "over_target",
                    f"the load is above what the server can answer within "
                    f"{constraint.target_ms:g} ms even at its cheapest point (predicted {predicted:.0f} ms)",
                    predicted,
                )
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        self.metrics.count("admitted")
        return now

    def _refuse(self, now_ms: float, reason: str, message: str, predicted_ms: float) -> NoReturn:
        self.metrics.count("refused", reason)
        raise Overloaded(message, retry_after_s(predicted_ms), self.pacer.delay_ms(now_ms) / 1000.0)

    def observe_decode(self, ms: float) -> None:
        """Decoding time of one upload (measured by the app, or by the inference process that decodes there): the cost
        outside the model, as a moving average capped at the target, so one huge upload cannot make admission refuse
        everything after it."""
        cap = self.options.target_p95_ms if self.options.target_p95_ms is not None else ms
        self.overhead_ms = 0.9 * self.overhead_ms + 0.1 * min(ms, cap)

    def finish(self, arrival_ms: float, answered: bool) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)
        if answered:
            self.recent_ms.append(self.clock() - arrival_ms)
            self.metrics.count("served")

    async def submit(
        self, image: Tensor | bytes, constraint: Constraint, topk: int | None = None, arrival_ms: float | None = None
    ) -> dict[str, Any]:
        """Queue one image (uint8 3 x H x W, or its encoded bytes for the inference worker to decode); returns its
        prediction once its batch has run. ``arrival_ms`` is what ``admit`` returned; without it the request is admitted
        here."""
        if arrival_ms is None:
            arrival = self.admit(constraint)
            answered = False
            try:
                out = await self.submit(image, constraint, topk, arrival)
                answered = True
                return out
            finally:
                self.finish(arrival, answered)
        future = asyncio.get_running_loop().create_future()
        self.queue.append(Pending(image, constraint, topk or self.options.topk, arrival_ms, future))
        self.metrics.queue.set(len(self.queue))
        self._wake()
        return await future

    def _wake(self) -> None:
        if self._arrived is not None:
            self._arrived.set()

    # --- batching ---
    def plan_batch(self, now_ms: float) -> tuple[ServingPoint, list[Pending], str]:
        """Take the next batch off the queue: the oldest request decides the point (within what it allows, by its
        latency budget and the whole queue's length), then every queued request that allows that point joins, in
        arrival order, up to max_batch."""
        while self.queue and self.queue[0].future.done():  # the client went away
            self.queue.popleft()
        head = self.queue[0]
        c = head.constraint
        decision = self.controller.choose(
            len(self.queue), now_ms - head.arrival_ms, c.allowed, c.target_ms if c.target_ms is not None else math.inf
        )
        batch, keep = [], deque()
        while self.queue:
            r = self.queue.popleft()
            if r.future.done():
                continue
            if len(batch) < self.options.max_batch and (
                r.constraint.allowed is None or decision.point in r.constraint.allowed
            ):
                batch.append(r)
            else:
                keep.append(r)
        self.queue = keep
        self.metrics.queue.set(len(self.queue))
        return self.points.named(decision.point), batch, decision.reason

    async def _fill(self) -> None:
        """Dynamic batching: wait until max_batch requests are queued or the oldest has waited max_wait_ms."""
        head = self.queue[0]
        while len(self.queue) < self.options.max_batch:
            left = head.arrival_ms + self.options.max_wait_ms - self.clock()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left / 1000.0)
            except asyncio.TimeoutError:  # noqa: UP041 - a different class on Python 3.10
                return

    async def _run(self) -> None:
        while True:
            while not self.queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._fill()
            if not any(not r.future.done() for r in self.queue):
                self.queue.clear()
                continue
            point, batch, _ = self.plan_batch(self.clock())
            start = self.clock()
            self._busy_until_ms = start + self.latency.batch_ms(point.name, len(batch))
            self._current, self._running = batch, len(batch)
            try:
                results, ms, decode_ms = await self.inference.run(
                    point.name, [r.image for r in batch], [r.topk for r in batch], self.decode
                )
            except asyncio.CancelledError:  # shutting down: nobody may wait forever for this batch
                self._fail(batch, Overloaded("the server is shutting down", 1))
                raise
            except Exception as e:  # noqa: BLE001 - a failed batch answers its requests and the server goes on
                self._fail(batch, e)
                continue
            finally:
                self._busy_until_ms, self._current, self._running = 0.0, [], 0
            # The round trip, not only the forward, limits how many batches a second the server runs: the latency
            # model learns the hand-off too. Decoding is left out (one huge upload must not read as a slower model).
            round_trip = self.clock() - start - decode_ms
            ran = sum(not isinstance(top, Refused) for top in results)
            if decode_ms and any(isinstance(r.image, bytes) for r in batch):
                self.observe_decode(decode_ms / len(batch))
            if ran:
                self.latency.observe(point.name, ran, ms, round_trip)
                self.metrics.inference.observe(ms / 1000.0)
                self.metrics.batch.observe(ran)
                self.metrics.served_at(point.name, [p.name for p in self.points.points], ran)
            self.metrics.correction.set(self.latency.correction)
            self.metrics.handoff.set(self.latency.handoff_ms / 1000.0)
            if len(self.recent_ms) >= 8:
                self.controller.feedback(sorted(self.recent_ms)[int(0.95 * (len(self.recent_ms) - 1))])
            done = self.clock()
            for r, top in zip(batch, results):
                if r.future.done():
                    continue
                if isinstance(top, Refused):
                    r.future.set_exception(top.error())
                else:
                    r.future.set_result(
                        {
                            "top": top,
                            "operating_point": point.describe(),
                            "latency_ms": round(done - r.arrival_ms, 3),
                            "queue_ms": round(start - r.arrival_ms, 3),
                            "inference_ms": round(ms, 3),
                            "batch_size": len(batch),
                        }
                    )

    @staticmethod
    def _fail(requests: list[Pending], error: BaseException) -> None:
        for r in requests:
            if not r.future.done():
                r.future.set_exception(error)

    def _worker_ended(self, task: asyncio.Task) -> None:
        """If the worker ever dies, answer everyone waiting instead of letting them hang."""
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._fail(list(self.queue) + self._current, RuntimeError(f"the inference worker stopped: {error!r}"))
            self.queue.clear()

    async def run_every_point(self, image: Tensor | bytes, topk: int = 5) -> list[dict[str, Any]]:
        """The image at every point, most accurate first (the page's side-by-side view); bypasses the queue."""
        out = []
        for p in self.points.by_preference():
            (top,), ms, _ = await self.inference.run(p.name, [image], [topk], self.decode)
            if isinstance(top, Refused):
                raise top.error()
            out.append({"operating_point": p.describe(), "top": top, "inference_ms": round(ms, 3)})
        return out

    # --- lifecycle ---
    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.create_task(self._run())
        self._worker.add_done_callback(self._worker_ended)
        self._lag_watch = asyncio.create_task(self._watch_loop_lag())

    async def _watch_loop_lag(self, period_ms: float = 10.0) -> None:
        """Measure the event loop's lag, and publish the per-second rates once a second."""
        rolled = self.clock()
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(period_ms / 1000)
            lag = max((time.perf_counter() - t0) * 1000 - period_ms, 0.0)
            self.loop_lag_ms = max(lag, 0.9 * self.loop_lag_ms)
            self.metrics.loop_lag.set(self.loop_lag_ms / 1000.0)
            now = self.clock()
            if now - rolled >= 1000.0:
                self.metrics.roll((now - rolled) / 1000.0)
                rolled = now

    async def stop(self) -> None:
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._fail(list(self.queue) + self._current, Overloaded("the server is shutting down", 1))
        self.queue.clear()
        self.inference.close()
