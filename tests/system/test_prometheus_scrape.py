"""The running suite as Prometheus sees it: every service's ``/metrics`` exports what the
dashboards read, and a real Prometheus (Debian's ``prometheus``) scraping the processes answers
every dashboard query, with data wherever the suite has produced some.

Prometheus gets the labels the Prometheus Operator adds in a cluster (``namespace`` and
``service``), so the dashboards' queries run here exactly as they do there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.chart.support import (
    PENDING_METRICS,
    concrete_query,
    dashboard_queries,
    metric_names,
    series_names,
)
from tools.devstack import SERVICES, Stack, free_port

PROMETHEUS = shutil.which("prometheus")
NAMESPACE = "spaces-local"
SCRAPE_INTERVAL_S = 1


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("scrape-stack"), auto_ports=True) as running:
        yield running


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> None:
    """Sign a user up through the gateway: HTTP metrics there, RPC metrics in identity."""
    gateway = stack.services["gateway"]
    reply = httpx.post(
        f"http://127.0.0.1:{gateway.http_port}/v1/users",
        json={
            "user": {"handle": "scraped_1", "displayName": "Scraped"},
            "password": "correct horse battery",
            "requestId": str(uuid.uuid4()),
        },
        timeout=30,
    )
    assert reply.status_code == 200, reply.text


@pytest.fixture(scope="module")
def scraped(stack: Stack, traffic: None) -> dict[str, str]:
    """Each service's /metrics text."""
    texts = {}
    for name, running in stack.services.items():
        with urllib.request.urlopen(
            f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10
        ) as reply:
            texts[name] = reply.read().decode()
    return texts


def _exported(text: str) -> set[str]:
    return series_names(text_string_to_metric_families(text))


def _with_samples(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_service_exports_spaces_metrics(stack: Stack, scraped: dict[str, str]) -> None:
    for name, text in scraped.items():
        exported = _exported(text)
        if stack.services[name].grpc_port is not None:
            assert "spaces_rpc_server_handled_total" in exported, name
        assert any(series.startswith(f"spaces_{name}_") for series in exported), name
    identity_rpcs = _with_samples(scraped["identity"])
    assert "spaces_rpc_server_handled_total" in identity_rpcs, "the sign-up was counted"


def test_every_metric_a_dashboard_reads_is_exported(scraped: dict[str, str]) -> None:
    exported = set().union(*(_exported(text) for text in scraped.values()))
    read = set().union(*(metric_names(expr) for _, _, expr in dashboard_queries()))
    # A service whose process is not written yet cannot be scraped; its names are checked
    # against its code by tests/chart/test_dashboards.py.
    unbuilt = tuple(f"spaces_{spec.name}_" for spec in SERVICES if not spec.is_built())
    required = {m for m in read if not m.startswith(unbuilt)} - set(PENDING_METRICS)
    assert {"spaces_rooms_live_watchers", "spaces_payments_ledger_imbalance"} <= required
    missing = required - exported
    assert missing == set(), f"dashboards read metrics the running suite does not export: {missing}"


# -- a real Prometheus ------------------------------------------------------------------------


def _prometheus_config(stack: Stack) -> dict[str, Any]:
    targets = [
        {
            "targets": [f"127.0.0.1:{running.metrics_port}"],
            "labels": {"namespace": NAMESPACE, "service": f"spaces-{name}"},
        }
        for name, running in stack.services.items()
    ]
    return {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "spaces", "static_configs": targets}],
    }


def _query(url: str, promql: str) -> dict[str, Any]:
    address = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(address, timeout=10) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    assert answer["status"] == "success", f"{promql}: {answer}"
    return answer


def _wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def prometheus(
    stack: Stack, traffic: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real Prometheus scraping every service; yields its base URL."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not found: install the Debian package 'prometheus' (.ci/run does)")
    folder: Path = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(stack)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(lambda: _ready(url) or process.poll() is not None, 30, "prometheus ready")
        assert process.poll() is None, (folder / "prometheus.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _targets_up(url: str, expected: int) -> bool:
    result = _query(url, f'up{{namespace="{NAMESPACE}"}} == 1')["data"]["result"]
    return len(result) == expected


def _scrapes_so_far(url: str) -> float:
    result = _query(url, f'min(count_over_time(up{{namespace="{NAMESPACE}"}}[1m]))')
    samples = result["data"]["result"]
    return float(samples[0]["value"][1]) if samples else 0.0


def test_prometheus_scrapes_every_service(prometheus: str, stack: Stack) -> None:
    _wait_for(lambda: _targets_up(prometheus, len(stack.services)), 30, "every target up")
    by_service = _query(prometheus, 'count by (service) ({__name__=~"spaces_.+"})')
    services = {r["metric"]["service"] for r in by_service["data"]["result"]}
    assert services == {f"spaces-{name}" for name in stack.services}


def test_prometheus_answers_every_dashboard_query(
    prometheus: str, stack: Stack, scraped: dict[str, str]
) -> None:
    _wait_for(lambda: _targets_up(prometheus, len(stack.services)), 30, "every target up")
    # rate() needs two samples in its window; wait for three scrapes of every target.
    _wait_for(lambda: _scrapes_so_far(prometheus) >= 3, 30, "three scrapes")
    with_samples = set().union(*(_with_samples(text) for text in scraped.values()))
    empty_but_present = []
    for stem, title, expr in dashboard_queries():
        query = concrete_query(expr, NAMESPACE)
        _query(prometheus, query)  # runs without error
        for metric in metric_names(expr) & with_samples:
            # The series the suite exports carry the labels the dashboards select on.
            selector = f'count({metric}{{namespace="{NAMESPACE}", service=~".*"}})'
            if not _query(prometheus, selector)["data"]["result"]:
                empty_but_present.append(f"{stem}/{title}: {metric}")
    assert empty_but_present == []
    # The overview has data as soon as anything was called.
    for title in (
        "RPC rate by service",
        "Latency p50 / p99 by service",
        "HTTP requests by status code",
    ):
        expr = next(e for s, t, e in dashboard_queries() if s == "overview" and t == title)
        result = _query(prometheus, concrete_query(expr, NAMESPACE))["data"]["result"]
        assert result, f"overview/{title} has no data"
