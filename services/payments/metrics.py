"""Prometheus metrics of payments (``spaces_payments_`` prefix, no user or Space labels)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

__all__ = [
    "DECLINES",
    "LEDGER_IMBALANCE",
    "PAYOUTS",
    "PROCESSOR_LATENCY",
    "PURCHASES",
    "REFUNDS",
    "TIPS",
]

PURCHASES = Counter(
    "spaces_payments_purchases_total",
    "Ticket purchase attempts by outcome (ok, sold_out, declined, closed, ...).",
    ["result"],
)
DECLINES = Counter(
    "spaces_payments_declines_total",
    "Payments the processor declined, by decline code.",
    ["code"],
)
REFUNDS = Counter(
    "spaces_payments_refunds_total",
    "Ticket refunds confirmed, by reason (host, space_canceled, system).",
    ["reason"],
)
TIPS = Counter("spaces_payments_tips_total", "Tips paid.")
PAYOUTS = Counter(
    "spaces_payments_payouts_total", "Payouts completed by outcome (paid, failed).", ["result"]
)
LEDGER_IMBALANCE = Gauge(
    "spaces_payments_ledger_imbalance",
    "Problems the last ledger check found: unbalanced entries plus currencies whose postings"
    " do not sum to zero plus ticket/ledger mismatches. 0 means the books balance.",
)
PROCESSOR_LATENCY = Histogram(
    "spaces_payments_processor_request_duration_seconds",
    "Duration of card processor calls by operation.",
    ["operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
