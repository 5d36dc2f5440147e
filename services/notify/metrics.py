"""Notify's Prometheus metrics (``spaces_notify_`` prefix, base units, no ids as labels)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

__all__ = [
    "DELIVERIES",
    "EVENTS",
    "FANOUT_BATCH_SECONDS",
    "FANOUT_LAG",
    "NOTIFICATIONS_CREATED",
    "REMINDERS_DUE",
    "REMINDERS_FIRED",
    "REMINDER_LATENESS",
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
FANOUT_BATCH_SECONDS = Histogram(
    "spaces_notify_fanout_batch_seconds",
    "Time to write one fan-out batch (insert, deliveries, cursor).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DELIVERIES = Counter(
    "spaces_notify_deliveries_total",
    "Delivery attempts by channel (webhook, push) and result (succeeded, retrying, "
    "dead_lettered, refused).",
    ["channel", "result"],
)
WEBHOOK_FAILURES = Counter(
    "spaces_notify_webhook_failures_total",
    "Failed webhook attempts by cause (http_status, timeout, connect, address_refused, redirect).",
    ["cause"],
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
