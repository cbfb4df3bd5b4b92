"""Prometheus metrics of one server (its own registry, so two servers or two tests never share counters)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flexres_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.latency = Histogram("flexres_request_latency_seconds", "time from arrival to response of answered predictions",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("flexres_batch_inference_seconds", "forward time of one batch (preprocessing included)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.point = Counter("flexres_operating_point", "requests served at each operating point", ["point"], registry=r)
        self.queue = Gauge("flexres_queue_length", "requests waiting for a batch", registry=r)
        self.inflight = Gauge("flexres_in_flight", "requests admitted and not yet answered (reading, decoding, queued, running)",
                              registry=r)
        self.batch = Histogram("flexres_batch_size", "requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.rejected = Counter("flexres_rejected", "requests refused before inference, by reason", ["reason"], registry=r)
        self.correction = Gauge("flexres_latency_correction", "observed / predicted batch time (moving average)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
