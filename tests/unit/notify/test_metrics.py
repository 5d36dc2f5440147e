"""Notify's metrics follow the conventions and include what the dashboards query."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from services.notify import metrics

# Each name a Grafana panel of notify may query (see the README's Metrics section).
DASHBOARD_METRICS = {
    "spaces_notify_fanout_lag_seconds": Gauge,
    "spaces_notify_fanout_pending_jobs": Gauge,
    "spaces_notify_fanout_duration_seconds": Histogram,
    "spaces_notify_fanout_batch_seconds": Histogram,
    "spaces_notify_notifications_created_total": Counter,
    "spaces_notify_events_total": Counter,
    "spaces_notify_deliveries_total": Counter,
    "spaces_notify_delivery_attempt_seconds": Histogram,
    "spaces_notify_webhook_failures_total": Counter,
    "spaces_notify_webhooks_disabled_total": Counter,
    "spaces_notify_reminders_due": Gauge,
    "spaces_notify_reminders_fired_total": Counter,
    "spaces_notify_reminder_lateness_seconds": Histogram,
    "spaces_notify_retention_purged_rows_total": Counter,
    "spaces_notify_retention_run_seconds": Histogram,
    "spaces_notify_retention_last_success_timestamp_seconds": Gauge,
}
# Per-entity labels would explode the number of series.
FORBIDDEN_LABELS = {"user", "user_id", "space", "space_id", "webhook", "device", "job"}


def exported() -> dict[str, MetricWrapperBase]:
    found = {}
    for attribute in metrics.__all__:
        metric = getattr(metrics, attribute)
        assert isinstance(metric, MetricWrapperBase), attribute
        name = metric.describe()[0].name
        # prometheus_client keeps counters' names without the _total suffix.
        found[name + "_total" if isinstance(metric, Counter) else name] = metric
    return found


def test_the_dashboard_metrics_exist_with_their_types() -> None:
    found = exported()
    assert set(found) == set(DASHBOARD_METRICS)
    for name, kind in DASHBOARD_METRICS.items():
        assert isinstance(found[name], kind), name


def test_names_units_and_labels_follow_the_conventions() -> None:
    for name, metric in exported().items():
        assert name.startswith("spaces_notify_"), name
        assert name.endswith("_total") == isinstance(metric, Counter), name
        if isinstance(metric, Histogram):
            assert name.endswith("_seconds"), name
        assert not FORBIDDEN_LABELS & set(metric._labelnames), name


def test_reminder_lateness_has_a_bucket_at_the_one_second_target() -> None:
    assert 1.0 in metrics.REMINDER_LATENESS._upper_bounds
