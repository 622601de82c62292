"""Prometheus metrics of one server, in a registry of its own (several apps may share a
process, as in tests, without mixing their counts)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    """Requests by route and status, latency, encoder batches, and the item count."""

    def __init__(self, count_items: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mmret_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mmret_http_request_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mmret_encoder_batch_size",
            "Inputs per encoder call: queries batched together, or a slice of items to add.",
            ["kind"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.encode_seconds = Histogram(
            "mmret_encoder_seconds",
            "Time of one encoder call.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.items_added = Counter(
            "mmret_items_added", "Items added through the API.", registry=self.registry
        )
        self.items_removed = Counter(
            "mmret_items_removed", "Items removed through the API.", registry=self.registry
        )
        items = Gauge("mmret_index_items", "Items in the index.", registry=self.registry)
        items.set_function(count_items)

    def encoder_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.encode_seconds.labels(kind).observe(seconds)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
