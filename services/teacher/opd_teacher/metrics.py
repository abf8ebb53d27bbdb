"""Prometheus metrics of the teacher service (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("opd_requests_total", "Requests by endpoint and outcome", ["endpoint", "code"])
REQUEST_SECONDS = Histogram(
    "opd_request_seconds", "End-to-end request time", ["endpoint"], buckets=_LATENCY_BUCKETS
)
FORWARD_SECONDS = Histogram(
    "opd_forward_seconds", "Teacher forward + scoring time", ["model"], buckets=_LATENCY_BUCKETS
)
SCORED_TOKENS = Counter("opd_scored_tokens_total", "Completion positions scored", ["model"])
FORWARD_TOKENS = Counter("opd_forward_tokens_total", "Tokens run through the teacher", ["model"])
INFLIGHT = Gauge("opd_inflight_requests", "Score requests being processed or waiting", ["model"])
READY = Gauge("opd_ready", "1 when the service is ready to score")
