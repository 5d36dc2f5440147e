"""Notify's Prometheus metrics (``spaces_notify_`` prefix, base units, no ids as labels)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

__all__ = [
    "DELIVERIES",
    "DELIVERY_ATTEMPT_SECONDS",
    "EVENTS",
    "FANOUT_BATCH_SECONDS",
    "FANOUT_DURATION",
    "FANOUT_LAG",
    "FANOUT_PENDING",
    "NOTIFICATIONS_CREATED",
    "REMINDERS_DUE",
    "REMINDERS_FIRED",
    "REMINDER_LATENESS",
    "RETENTION_LAST_SUCCESS",
    "RETENTION_PURGED",
    "RETENTION_RUN_SECONDS",
    "WEBHOOKS_DISABLED",
    "WEBHOOK_FAILURES",
]

NOTIFICATIONS_CREATED = Counter(
    "spaces_notify_notifications_created_total",
    "Notifications written to inboxes, by source (event, fanout, reminder).",
    ["source"],
)
EVENTS = Counter(
    "spaces_notify_events_total",
    "Stream events handled, by result (applied, duplicate, ignored).",
    ["result"],
)
FANOUT_LAG = Gauge(
    "spaces_notify_fanout_lag_seconds",
    "Age of the oldest unfinished follower fan-out (0 when none is pending).",
)
FANOUT_PENDING = Gauge(
    "spaces_notify_fanout_pending_jobs",
    "Follower fan-outs not finished yet (all replicas).",
)
FANOUT_DURATION = Histogram(
    "spaces_notify_fanout_duration_seconds",
    "Time from a fan-out's event to its last follower's notification (one job).",
    buckets=(0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0),
)
FANOUT_BATCH_SECONDS = Histogram(
    "spaces_notify_fanout_batch_seconds",
    "Time to write one fan-out batch (insert, deliveries, cursor).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DELIVERIES = Counter(
    "spaces_notify_deliveries_total",
    "Delivery attempts by channel (webhook, push) and result (succeeded, retrying, dead_lettered).",
    ["channel", "result"],
)
DELIVERY_ATTEMPT_SECONDS = Histogram(
    "spaces_notify_delivery_attempt_seconds",
    "Duration of one delivery attempt (address check, request, answer), by channel.",
    ["channel"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WEBHOOK_FAILURES = Counter(
    "spaces_notify_webhook_failures_total",
    "Failed webhook attempts by cause (http_status, timeout, connect, address_refused, "
    "redirect, other).",
    ["cause"],
)
WEBHOOKS_DISABLED = Counter(
    "spaces_notify_webhooks_disabled_total",
    "Webhooks disabled because their attempts kept failing.",
)
REMINDERS_DUE = Gauge(
    "spaces_notify_reminders_due",
    "Scheduled reminders whose fire time has passed but that have not fired yet.",
)
REMINDERS_FIRED = Counter("spaces_notify_reminders_fired_total", "Reminders sent.")
REMINDER_LATENESS = Histogram(
    "spaces_notify_reminder_lateness_seconds",
    "How long after its fire time a reminder was sent.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 30.0),
)
RETENTION_PURGED = Counter(
    "spaces_notify_retention_purged_rows_total",
    "Rows deleted by the retention purge, by table.",
    ["table"],
)
RETENTION_RUN_SECONDS = Histogram(
    "spaces_notify_retention_run_seconds",
    "Duration of one retention purge run.",
    buckets=(0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0),
)
RETENTION_LAST_SUCCESS = Gauge(
    "spaces_notify_retention_last_success_timestamp_seconds",
    "Unix time of the last completed retention purge on this replica (0 before the first).",
)
