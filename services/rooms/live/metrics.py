"""Prometheus metrics of the live machinery (``spaces_rooms_live_`` prefix, no ids as labels)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

__all__ = [
    "APPENDED",
    "DELIVERED",
    "FEED_LAG",
    "PUBLISHED",
    "PUBLISH_FAILURES",
    "REPAIRED",
    "WATCHED_SPACES",
    "WATCHERS",
    "WATCH_ENDS",
]

APPENDED = Counter(
    "spaces_rooms_live_events_appended_total",
    "Events appended to Spaces' logs by this process, by kind (the SpaceEvent oneof field).",
    ["kind"],
)
PUBLISHED = Counter(
    "spaces_rooms_live_events_published_total",
    "Events this process appended whose transaction committed; each then reaches the "
    "Space's watchers on every replica. sum(rate()) across replicas is events/s published.",
)
DELIVERED = Counter(
    "spaces_rooms_live_event_deliveries_total",
    "Events released to this process's watchers, once per watcher of the Space (the fan-out "
    "work; a watcher's filter may still hold some back).",
)
PUBLISH_FAILURES = Counter(
    "spaces_rooms_live_publish_failures_total",
    "Committed events whose Redis publish failed (watchers get them from PostgreSQL).",
)
REPAIRED = Counter(
    "spaces_rooms_live_repaired_events_total",
    "Events a hub read back from PostgreSQL because Redis had not brought them in time.",
)
WATCHERS = Gauge("spaces_rooms_live_watchers", "WatchSpace streams open in this process.")
WATCHED_SPACES = Gauge(
    "spaces_rooms_live_watched_spaces", "Spaces with at least one watcher in this process."
)
WATCH_ENDS = Counter(
    "spaces_rooms_live_watch_ends_total",
    "WatchSpace streams that ended, by reason (space_ended, closed, too_slow, interrupted).",
    ["reason"],
)
FEED_LAG = Histogram(
    "spaces_rooms_live_feed_lag_seconds",
    "From an event's append to its release to this process's watchers.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
