"""Which operating point serves the next batch: a latency model per point and a controller that keeps a latency
target by lowering the point when the queue grows, and raising it again when the queue drains.

Pure Python (no torch, no clock of its own), so its decisions can be tested with a synthetic latency model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class LatencyModel:
    """Service time of a batch at a point: ``fixed_ms + per_image_ms * batch`` (measured at start-up), times one
    ``correction`` shared by all points, plus ``handoff_ms`` per batch; both learned from the batches actually served.
    When something else loads the machine every point slows down together, and a slowdown seen at one point is a
    prediction for all. The hand-off (a batch's way to the inference worker and its results' way back: threads that
    wait for the server's GIL, a child process's pipes) costs the same whatever the point and the batch size, so it
    is added, not multiplied: a correction learned from small batches would otherwise predict full batches far too
    slow, admission would keep the batches small, and they would keep teaching it so."""

    fixed_ms: dict[str, float]
    per_image_ms: dict[str, float]
    correction: float = 1.0
    smoothing: float = 0.2  # weight of the newest observation in the moving averages
    learn: bool = True
    handoff_ms: float = 0.0

    def batch_ms(self, point: str, batch: int) -> float:
        return self.correction * (self.fixed_ms[point] + self.per_image_ms[point] * max(batch, 1)) + self.handoff_ms

    def drain_ms(self, point: str, queued: int, max_batch: int) -> float:
        """Time to serve ``queued`` requests in full batches of ``max_batch`` (and one partial) at ``point``."""
        full, rest = divmod(max(queued, 1), max_batch)
        return full * self.batch_ms(point, max_batch) + (self.batch_ms(point, rest) if rest else 0.0)

    def observe(self, point: str, batch: int, ms: float, round_trip_ms: float | None = None) -> None:
        """A served batch: ``ms`` its time in the worker, ``round_trip_ms`` from its dispatch to its results (none:
        the hand-off is not learned)."""
        if not self.learn:
            return
        base = self.fixed_ms[point] + self.per_image_ms[point] * max(batch, 1)
        ratio = min(max(ms / base, 0.1), 20.0)  # one outlier (a GC pause) must not swing every decision
        self.correction = (1 - self.smoothing) * self.correction + self.smoothing * ratio
        if round_trip_ms is not None:
            handoff = min(max(round_trip_ms - ms, 0.0), 20.0 * max(ms, 1.0))  # nor one restart of the worker
            self.handoff_ms = (1 - self.smoothing) * self.handoff_ms + self.smoothing * handoff

    @classmethod
    def measure(cls, points: Sequence[str], time_batch: Callable[[str, int], float], max_batch: int) -> LatencyModel:
        """Fit fixed and per-image cost of every point from two timed batch sizes (1 and ``max_batch``)."""
        fixed, per = {}, {}
        for p in points:
            one = time_batch(p, 1)
            many = time_batch(p, max_batch) if max_batch > 1 else one
            slope = max((many - one) / (max_batch - 1), 0.0) if max_batch > 1 else one
            per[p] = slope if max_batch > 1 else one
            fixed[p] = max(one - per[p], 0.0)
        return cls(fixed, per)


@dataclass
class Decision:
    point: str
    predicted_ms: float  # predicted latency of the slowest request of the queue if it all runs at ``point``
    reason: str


@dataclass
class AdaptiveController:
    """Picks the most accurate point whose predicted latency keeps ``target_ms`` (times ``headroom``: the
    estimate ignores the requests that arrive meanwhile) for the requests already queued.

    For a queue of ``n`` requests whose oldest has waited ``w`` ms, serving everything at point p makes the
    oldest wait ``w + batch(p)`` and the newest ``drain(p, n)``; the controller takes the first point, in order of
    preference, where both fit. A longer queue makes drain(p, n) larger, so it moves down; when the queue drains it
    moves back up by the same rule.

    What the model does not see (HTTP parsing, JPEG decoding, other processes) is corrected by feedback: when the
    p95 of the latencies clients actually got is over the target, ``scale`` shrinks the budget the model plans with
    (x0.85 per report); when it is well under (below 70 %), the budget grows back (x1.05, up to the full budget).
    """

    preference: list[str]  # most accurate first
    latency: LatencyModel
    target_ms: float
    max_batch: int
    headroom: float = 0.8
    scale: float = 1.0  # feedback from observed latency, in [min_scale, 1]
    min_scale: float = 0.1

    def feedback(self, observed_p95_ms: float) -> None:
        if observed_p95_ms > self.target_ms:
            self.scale = max(self.min_scale, self.scale * 0.85)
        elif observed_p95_ms < 0.7 * self.target_ms:
            self.scale = min(1.0, self.scale * 1.05)

    def predicted_ms(self, point: str, queued: int, oldest_wait_ms: float) -> float:
        first = self.latency.batch_ms(point, min(max(queued, 1), self.max_batch))
        return max(oldest_wait_ms + first, self.latency.drain_ms(point, queued, self.max_batch))

    def choose(
        self,
        queued: int,
        oldest_wait_ms: float = 0.0,
        allowed: Sequence[str] | None = None,
        target_ms: float | None = None,
    ) -> Decision:
        target = (self.target_ms if target_ms is None else target_ms) * self.headroom * self.scale
        options = [p for p in self.preference if allowed is None or p in allowed]
        if not options:
            raise ValueError("no allowed operating point")
        for p in options:
            ms = self.predicted_ms(p, queued, oldest_wait_ms)
            if ms <= target:
                decision = Decision(p, ms, "fits the target")
                break
        else:  # even the cheapest misses: serve the fastest and let admission control shed the excess
            fastest = min(options, key=lambda q: self.predicted_ms(q, queued, oldest_wait_ms))
            decision = Decision(
                fastest, self.predicted_ms(fastest, queued, oldest_wait_ms), "over target at every point"
            )
        return decision

    def admits(
        self,
        ahead: int,
        busy_ms: float,
        allowed: Sequence[str] | None = None,
        target_ms: float | None = None,
        overhead_ms: float = 0.0,
    ) -> tuple[bool, float]:
        """Whether a new request can meet the target behind ``ahead`` requests (accepted, not yet answered or running)
        and ``busy_ms`` of work in flight, if those run at the fastest point in full batches; and its predicted latency
        (for a Retry-After).

        A request that may run at the fastest point joins those batches (it and the queue drain together, so what is
        admitted is bounded by what the cheapest point serves within the target); one pinned elsewhere runs in a batch
        of its own after them, at its fastest allowed point. ``overhead_ms`` is its own time outside the model
        (decoding, which other requests do meanwhile on the server's threads; in the inference process it is serial
        with the batches, which this ignores). The target must also leave room for one more full batch at the fastest
        point: the batch that may start while this request's body is still being read, which it then waits out. It is
        scaled by the feedback from observed latency, as in ``choose``: under overload the point is already the
        cheapest, and only admitting fewer brings what the model does not see back within the target."""
        fastest = min(self.preference, key=lambda p: self.latency.batch_ms(p, self.max_batch))
        if allowed is None or fastest in allowed:
            ms = busy_ms + self.latency.drain_ms(fastest, ahead + 1, self.max_batch) + overhead_ms
        else:
            queue_ms = self.latency.drain_ms(fastest, ahead, self.max_batch) if ahead else 0.0
            ms = busy_ms + queue_ms + min(self.latency.batch_ms(p, 1) for p in allowed) + overhead_ms
        missed = self.latency.batch_ms(fastest, self.max_batch)
        return ms + missed <= (self.target_ms if target_ms is None else target_ms) * self.scale, ms


@dataclass
class RefusalPacer:
    """When to answer a refusal: at once while refusals stay under ``rate_per_s`` (with ``burst_s`` of credit), else
    in turn, one every 1 / rate_per_s, and never later than ``max_delay_ms``.

    A client that re-sends as soon as it is refused (ignoring Retry-After) is refused again at once, so answering
    refusals at once only turns the server's CPU into more refusals: the event loop and the GIL go to answering 503s,
    the batches' hand-offs and the admitted requests wait behind them, and the predictions per second collapse.
    Answering them in turn bounds the server's work on refusals at about ``rate_per_s`` whatever the number of such
    clients (a held refusal costs a timer, not CPU); the wait is what they pay instead, about (refused clients) /
    rate_per_s. Past ``max_delay_ms`` a refusal takes no turn and is answered after that wait: open-loop arrivals
    faster than the rate cannot pile up without bound. ``rate_per_s`` None: every refusal answered at once."""

    rate_per_s: float | None = 1000.0
    burst_s: float = 0.1
    max_delay_ms: float = 500.0
    next_ms: float = -math.inf  # the next free turn

    def delay_ms(self, now_ms: float) -> float:
        if not self.rate_per_s:
            return 0.0
        interval = 1000.0 / self.rate_per_s
        turn = max(self.next_ms, now_ms - self.burst_s * 1000.0)
        if turn - now_ms > self.max_delay_ms:
            return self.max_delay_ms
        self.next_ms = turn + interval
        return max(turn - now_ms, 0.0)


def retry_after_s(predicted_ms: float) -> int:
    """Seconds a rejected client should wait: the time the current queue needs, at least one."""
    return max(1, math.ceil(predicted_ms / 1000.0))
