"""The gateway's Prometheus metrics. ``route`` is a path template, never a concrete path."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram

logger = logging.getLogger(__name__)

__all__ = ["HTTP_REQUESTS", "HTTP_REQUEST_DURATION", "UNMATCHED_ROUTE", "WEBSOCKET_STREAMS"]

UNMATCHED_ROUTE = "unmatched"

HTTP_REQUESTS = Counter(
    "spaces_gateway_http_requests",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "code"],
)
HTTP_REQUEST_DURATION = Histogram(
    "spaces_gateway_http_request_duration_seconds",
    "Time from a request's arrival to its response's start (streams: to the first byte).",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WEBSOCKET_STREAMS = Counter(
    "spaces_gateway_websocket_streams",
    "WebSocket streams opened, by route template.",
    ["route"],
)
