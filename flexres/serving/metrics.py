"""Prometheus metrics of one server (its own registry, so two servers or two tests never share counters)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
FLOWS = ("admitted", "refused", "served")  # what the per-second gauges count


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flexres_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "flexres_request_latency_seconds",
            "time from arrival to response of answered predictions",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refusal_latency = Histogram(
            "flexres_refusal_latency_seconds",
            "time from arrival to a 503 (its hold included: refusals over their rate wait their turn)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "flexres_batch_inference_seconds",
            "forward time of one batch (preprocessing included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.point = Counter(
            "flexres_operating_point", "requests served at each operating point", ["point"], registry=r
        )
        self.serving_point = Gauge(
            "flexres_serving_point",
            "1 for the operating point of the last batch, 0 for the others",
            ["point"],
            registry=r,
        )
        self.queue = Gauge("flexres_queue_length", "requests waiting for a batch", registry=r)
        self.inflight = Gauge(
            "flexres_in_flight",
            "requests admitted and not yet answered (reading, decoding, queued, running)",
            registry=r,
        )
        self.batch = Histogram("flexres_batch_size", "requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.admitted = Counter(
            "flexres_admitted", "requests admitted to the queue (/predict and /predict/all)", registry=r
        )
        self.rejected = Counter(
            "flexres_rejected", "requests refused (503) before their body was read, by reason", ["reason"], registry=r
        )
        self.served = Counter("flexres_served", "admitted requests answered with a prediction", registry=r)
        self.per_second = Gauge(
            "flexres_per_second",
            "admitted, refused and served requests per second, over the last full second",
            ["flow"],
            registry=r,
        )
        self.correction = Gauge(
            "flexres_latency_correction", "observed / predicted batch time (moving average)", registry=r
        )
        self.handoff = Gauge(
            "flexres_batch_handoff_seconds",
            "a batch's round trip beyond its time in the inference worker (moving average)",
            registry=r,
        )
        self.loop_lag = Gauge(
            "flexres_loop_lag_seconds", "how late the event loop runs what is due (decaying maximum)", registry=r
        )
        self._window = dict.fromkeys(FLOWS, 0)  # counts since the last roll
        for flow in FLOWS:
            self.per_second.labels(flow).set(0)

    def count(self, flow: str, reason: str | None = None) -> None:
        """One request admitted, refused (with its reason) or served: its counter and the current second's count."""
        if flow == "refused":
            self.rejected.labels(reason).inc()
        else:
            getattr(self, flow).inc()
        self._window[flow] += 1

    def roll(self, seconds: float) -> None:
        """Publish the counts of the last ``seconds`` as per-second rates and start a new window."""
        for flow, n in self._window.items():
            self.per_second.labels(flow).set(n / seconds if seconds > 0 else 0.0)
        self._window = dict.fromkeys(FLOWS, 0)

    def served_at(self, point: str, points: list[str], n: int) -> None:
        self.point.labels(point).inc(n)
        for p in points:
            self.serving_point.labels(p).set(1.0 if p == point else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
