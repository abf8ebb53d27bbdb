"""Prometheus metrics of the teacher service (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_JOBS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("opd_requests_total", "Requests by endpoint and outcome", ["endpoint", "code"])
REQUEST_SECONDS = Histogram(
    "opd_request_seconds",
    "Time in the HTTP or gRPC handler, by endpoint",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
SCORE_SECONDS = Histogram(
    "opd_score_seconds",
    "End-to-end score time in the engine: validation, queue, forward (HTTP and gRPC)",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "opd_queue_seconds",
    "Time a score request waited for its batch to start",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
FORWARD_SECONDS = Histogram(
    "opd_forward_seconds", "Time of one batched forward + scoring", ["model"], buckets=_LATENCY_BUCKETS
)
BATCH_JOBS = Histogram(
    "opd_batch_requests", "Score requests per batched forward", ["model"], buckets=_JOBS_BUCKETS
)
QUEUE_REQUESTS = Gauge("opd_queue_requests", "Score requests waiting for a batch", ["model"])
QUEUE_TOKENS = Gauge("opd_queue_tokens", "Tokens (teacher view) waiting for a batch", ["model"])
BATCH_TOKENS = Gauge("opd_batch_tokens", "Tokens in the forward running now (0 when idle)", ["model"])
REJECTED = Counter(
    "opd_rejected_total", "Score requests dropped before compute, by reason", ["model", "reason"]
)
SCORED_TOKENS = Counter("opd_scored_tokens_total", "Completion positions scored", ["model"])
FORWARD_TOKENS = Counter(
    "opd_forward_tokens_total",
    "Tokens run through the teacher (a prompt shared in a batch counts once)",
    ["model"],
)
GENERATED_TOKENS = Counter(
    "opd_generated_tokens_total", "Tokens sampled by /v1/completions and /v1/chat/completions", ["model"]
)
INFLIGHT = Gauge("opd_inflight_requests", "Score requests being processed or waiting", ["model"])
READY = Gauge("opd_ready", "1 when the service is ready to score")
WEIGHT_UPDATES = Counter(
    "opd_weight_updates_total", "Live weight updates (pushes and reloads) by outcome", ["model", "outcome"]
)
WEIGHTS_VERSION = Gauge("opd_weights_version", "The weights version served now (0 as loaded)", ["model"])
