"""values.schema.json: the defaults pass, values of the wrong type or shape are refused
(by Helm itself, before any template runs), and every service block has the issue's keys."""

from __future__ import annotations

import json
from typing import Any

import helm_python
import pytest
import yaml

from tests.chart.support import CHART_DIR, COMPONENTS, render

SERVICE_BLOCK_KEYS = {
    "enabled",
    "replicaCount",
    "image",
    "resources",
    "autoscaling",
    "podDisruptionBudget",
    "env",
    "nodeSelector",
    "tolerations",
    "affinity",
}

BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "replica count as text": ({"rooms": {"replicaCount": "two"}}, "/rooms/replicaCount"),
    "enabled as text": ({"notify": {"enabled": "yes"}}, "/notify/enabled"),
    "a misspelt key": ({"rooms": {"replicas": 3}}, "replicas"),
    "image tag as a number": ({"image": {"tag": 1.2}}, "/image/tag"),
    "env value as a number": (
        {"gateway": {"env": {"GATEWAY_RATE_LIMIT_BURST": 10}}},
        "/gateway/env",
    ),
    "unknown media mode": ({"media": {"udp": {"mode": "hostNetwork"}}}, "/media/udp/mode"),
    "port out of range": ({"media": {"udp": {"port": 70000}}}, "/media/udp/port"),
    "autoscaling as a flag": ({"gateway": {"autoscaling": True}}, "/gateway/autoscaling"),
    "max replicas as text": (
        {"rooms": {"autoscaling": {"maxReplicas": "ten"}}},
        "/rooms/autoscaling/maxReplicas",
    ),
    "tolerations as a map": ({"identity": {"tolerations": {"key": "x"}}}, "/identity/tolerations"),
    "secret key as a number": ({"secrets": {"redisUrl": {"key": 5}}}, "/secrets/redisUrl/key"),
    "an inlined secret": (
        {"secrets": {"databaseUrl": "postgresql://u:p@db/spaces"}},
        "databaseUrl",
    ),
    "otlp endpoint without scheme": (
        {"config": {"otlpEndpoint": "collector:4317"}},
        "/config/otlpEndpoint",
    ),
    "service monitor interval as a number": (
        {"serviceMonitor": {"interval": 30}},
        "/serviceMonitor/interval",
    ),
    "network policy flag as text": (
        {"networkPolicy": {"enabled": "true"}},
        "/networkPolicy/enabled",
    ),
}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


def test_defaults_pass_the_schema(chart: Any) -> None:
    chart.validate_schema({})


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_refuses_wrong_types(chart: Any, case: str) -> None:
    values, where = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError, match=where):
        chart.validate_schema(values)


def test_rendering_refuses_a_bad_values_file() -> None:
    """What `helm install -f bad.yaml` does: the schema stops it before any template runs."""
    bad = yaml.safe_load("rooms:\n  replicaCount: many\n")
    with pytest.raises(helm_python.HelmError, match="replicaCount"):
        render(bad)


def test_every_service_block_has_the_issue_shape() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    for component in COMPONENTS:
        assert SERVICE_BLOCK_KEYS <= set(values[component]), component
        assert SERVICE_BLOCK_KEYS <= set(schema["properties"][component]["required"]), component
        # Resources are left to the operator except where the HPA needs a CPU request.
        if not values[component]["autoscaling"]["enabled"]:
            assert values[component]["resources"] == {}, component
