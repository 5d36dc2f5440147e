"""Grafana dashboards (deploy/grafana): they load as Grafana dashboards, every query is
scoped by the namespace/service variables, parses as PromQL (Prometheus' own parser, through
promtool) and reads only metrics the services declare."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.support import (
    PENDING_METRICS,
    SCHEMAS_DIR,
    concrete_query,
    dashboard_queries,
    dashboards,
    declared_series,
    metric_names,
)

PROMTOOL = shutil.which("promtool")
# A series selector: one of ours, or Prometheus' own `up`, with its label matchers.
_SELECTOR = re.compile(r"(?<![\w\"])(spaces_[a-z0-9_]+|up)\b(\{[^}]*\})?")

#: What each dashboard must show, as the series its queries read (the issue's list).
REQUIRED_SERIES = {
    "overview": {
        "spaces_rpc_server_handled_total",
        "spaces_rpc_server_duration_seconds_bucket",
        "spaces_gateway_http_requests_total",
    },
    "media": {
        "spaces_media_forward_latency_seconds_bucket",
        "spaces_media_packets_received_total",
        "spaces_media_packets_sent_total",
        "spaces_media_packets_dropped_total",
        "spaces_media_peers",
        "spaces_media_receiver_loss_ratio_bucket",
        "spaces_media_receiver_jitter_seconds_bucket",
        "spaces_media_round_trip_time_seconds_bucket",
        "spaces_media_relay_streams",
    },
    "rooms": {
        "spaces_rooms_live_spaces",
        "spaces_rooms_participants",
        "spaces_rooms_live_events_appended_total",
        "spaces_rooms_live_watchers",
    },
    "notify": {
        "spaces_notify_fanout_lag_seconds",
        "spaces_notify_deliveries_total",
        "spaces_notify_webhook_failures_total",
        "spaces_notify_reminders_due",
        "spaces_notify_reminders_fired_total",
    },
    "payments": {
        "spaces_payments_purchases_total",
        "spaces_payments_declines_total",
        "spaces_payments_refunds_total",
        "spaces_payments_ledger_imbalance",
    },
}


@pytest.fixture(scope="module")
def boards() -> dict[str, dict[str, Any]]:
    return dashboards()


def test_dashboards_load_as_grafana_dashboards(boards: dict[str, dict[str, Any]]) -> None:
    schema = json.loads((SCHEMAS_DIR / "grafana_dashboard.json").read_text())
    assert set(boards) == set(REQUIRED_SERIES)
    for stem, board in boards.items():
        jsonschema.Draft202012Validator(schema).validate(board)
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), f"{stem}: duplicate panel ids"
    uids = [board["uid"] for board in boards.values()]
    assert len(uids) == len(set(uids))


def test_panels_fit_the_grid_without_overlapping(boards: dict[str, dict[str, Any]]) -> None:
    for stem, board in boards.items():
        taken: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{stem}: {panel['title']}"
            cells = {
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            }
            assert not cells & taken, f"{stem}: {panel['title']} overlaps another panel"
            taken |= cells


def test_datasource_namespace_and_service_variables(boards: dict[str, dict[str, Any]]) -> None:
    for stem, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert list(variables) == ["datasource", "namespace", "service"], stem
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["namespace"]["query"]["query"] == "label_values(up, namespace)"
        service = variables["service"]
        # Services are those of the chosen namespace; "All" must match every one.
        assert 'namespace="$namespace"' in service["query"]["query"]
        assert service["includeAll"] and service["allValue"] == ".*"


def test_every_query_is_scoped_by_namespace_and_service() -> None:
    queries = dashboard_queries()
    assert len(queries) > 40
    for stem, title, expr in queries:
        selectors = _SELECTOR.findall(expr)
        assert selectors, f"{stem}/{title}: reads no series"
        for metric, labels in selectors:
            where = f"{stem}/{title}: {metric}"
            assert 'namespace="$namespace"' in labels, where
            assert 'service=~"$service"' in labels, where


def test_dashboards_show_what_the_issue_lists() -> None:
    read: dict[str, set[str]] = {}
    for stem, _, expr in dashboard_queries():
        read.setdefault(stem, set()).update(metric_names(expr))
    for stem, required in REQUIRED_SERIES.items():
        assert required <= read[stem], f"{stem} lacks {sorted(required - read[stem])}"
    media = dashboards()["media"]
    heatmaps = [p for p in media["panels"] if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["targets"][0]["format"] == "heatmap"


def test_every_metric_a_dashboard_reads_is_declared_by_the_services() -> None:
    declared = declared_series()
    read = set().union(*(metric_names(expr) for _, _, expr in dashboard_queries()))
    missing = read - declared - set(PENDING_METRICS)
    assert missing == set(), f"dashboards read metrics no service declares: {sorted(missing)}"


def test_pending_metrics_are_still_pending() -> None:
    """When a pending metric lands, it must leave PENDING_METRICS (so this list stays true)."""
    landed = set(PENDING_METRICS) & declared_series()
    assert landed == set(), f"now exported, remove from PENDING_METRICS: {sorted(landed)}"


@pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install the Debian package 'prometheus' (.ci/run does)",
)
def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    """Each query, variables substituted as Grafana does, as a recording rule for promtool."""
    assert PROMTOOL is not None
    rules = [
        {"record": f"spaces:dashboard_query:{index}", "expr": concrete_query(expr)}
        for index, (_, _, expr) in enumerate(dashboard_queries())
    ]
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install the Debian package 'prometheus' (.ci/run does)",
)
def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    """The parse check above is real: a query with a syntax error fails it."""
    assert PROMTOOL is not None
    broken = concrete_query(dashboard_queries()[0][2]).replace(")", "", 1)
    rule_file = tmp_path / "broken.yml"
    rule = {"record": "spaces:broken", "expr": broken}
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [rule]}]}))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
