"""Prometheus metrics of every call through the service (exposed at /metrics by the gateway)."""

from __future__ import annotations

from functools import cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "dashboard_requests",
    "Calls through the service, by function, model, source and outcome.",
    ["function", "model", "source", "status"],
)
ERRORS = Counter(
    "dashboard_errors",
    "Failed or refused calls, by function, model and error.",
    ["function", "model", "error"],
)
LATENCY = Histogram(
    "dashboard_request_duration_seconds",
    "Time from the call's start to its last byte, by function and source.",
    ["function", "source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TOKENS = Counter(
    "dashboard_tokens",
    "Tokens used, by function, model and kind (prompt or completion).",
    ["function", "model", "kind"],
)
FALLBACKS = Counter(
    "dashboard_fallbacks",
    "Calls a backend could not answer (connection, 429, 5xx) that went to a fallback, by "
    "function, the backend that failed and the one tried next.",
    ["function", "backend", "to"],
)
IN_FLIGHT = Gauge(
    "dashboard_in_flight_requests", "Calls being served right now, by function.", ["function"]
)


@cache
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: prometheus_client checks the labels and takes
    a lock on every call, and each call through the service does six. The labels' values are
    bounded (models outside the configured ones are "other"), and so is this cache."""
    return metric.labels(*labels)


def observe(
    *,
    function: str,
    model: str | None,
    source: str,
    status: str,
    seconds: float,
    prompt_tokens: int,
    completion_tokens: int,
) -> None:
    """Record one finished call."""
    model = model or ""
    child(REQUESTS, function, model, source, status).inc()
    if status != "ok":
        child(ERRORS, function, model, status).inc()
    child(LATENCY, function, source).observe(seconds)
    if prompt_tokens:
        child(TOKENS, function, model, "prompt").inc(prompt_tokens)
    if completion_tokens:
        child(TOKENS, function, model, "completion").inc(completion_tokens)
