"""Rendering the chart with the real Helm engine and validating what comes out.

Shared by the chart tests: :func:`render` runs Helm's Go SDK (``helm-python-sdk``) offline,
:func:`validate` checks one manifest against the Kubernetes JSON schemas of
:data:`KUBE_VERSION` (``kubernetes-validate``, strict: unknown fields are errors), or against
our ServiceMonitor schema for the Prometheus Operator's kind.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml
from prometheus_client import REGISTRY, Metric

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "spaces"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"

#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion: native gRPC probes).
KUBE_VERSION = "1.30.0"
RELEASE = "spaces"
NAMESPACE = "spaces-test"

#: Every service, as the chart's values name them.
COMPONENTS: tuple[str, ...] = ("identity", "payments", "notify", "media", "rooms", "gateway")
GRPC_COMPONENTS: tuple[str, ...] = tuple(c for c in COMPONENTS if c != "gateway")

STANDARD_LABELS: tuple[str, ...] = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
)

Manifest = dict[str, Any]


def render_files(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Render the chart; return {template path: rendered text} as Helm produced it."""
    with helm_python.Chart.load(CHART_DIR) as chart:
        return chart.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE)


def manifests_of(files: Mapping[str, str]) -> list[Manifest]:
    """Every Kubernetes object in rendered files (NOTES.txt and empty documents left out)."""
    found: list[Manifest] = []
    for path, text in sorted(files.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        found.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return found


def render(values: Mapping[str, Any] | None = None) -> list[Manifest]:
    """Render the chart with ``values`` and parse every object."""
    return manifests_of(render_files(values))


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    """The one object of ``kind`` called ``name``."""
    matches = [m for m in of_kind(manifests, kind) if m["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: found {len(matches)}"
    return matches[0]


def component_of(manifest: Manifest) -> str | None:
    labels: dict[str, str] = manifest["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/component")


def deployment(manifests: list[Manifest], component: str) -> Manifest:
    return named(manifests, "Deployment", f"{RELEASE}-{component}")


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every object that runs pods."""
    for manifest in manifests:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] in ("Deployment", "Job"):
            yield name, manifest["spec"]["template"]["spec"]
        elif manifest["kind"] == "Pod":
            yield name, manifest["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def _service_monitor_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS_DIR / "servicemonitor.json").read_text())
    return schema


def validate(manifest: Manifest) -> None:
    """Raise if ``manifest`` does not validate against its kind's schema."""
    if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.Draft202012Validator(_service_monitor_schema()).validate(manifest)
        return
    kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


# Grafana substitutes these before a query reaches Prometheus.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$namespace": NAMESPACE,
    "$service": ".*",
}
_METRIC_NAME = re.compile(r"\bspaces_[a-z0-9_]+\b")


def concrete_query(expr: str, namespace: str = NAMESPACE) -> str:
    """A dashboard query with Grafana's variables replaced the way Grafana would."""
    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, namespace if variable == "$namespace" else value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The ``spaces_`` series a query reads (every metric of ours has that prefix)."""
    return set(_METRIC_NAME.findall(expr))


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard in deploy/grafana by file stem."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(GRAFANA_DIR.glob("*.json"))}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every query of every dashboard."""
    queries = []
    for stem, board in dashboards().items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                queries.append((stem, panel["title"], target["expr"]))
    return queries


# -- metrics the services export -----------------------------------------------------------

#: Metrics the dashboards read that no service exports yet, with who is adding them. A name
#: here that some service starts exporting makes the dashboard test fail: take it out then.
#: Empty: rooms now exports spaces_rooms_live_spaces and spaces_rooms_participants
#: (services/rooms/metrics.py), the last names that were pending.
PENDING_METRICS: dict[str, str] = {}

_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def series_names(families: Iterable[Metric]) -> set[str]:
    """Every series name metric families expose, samples or not (a labelled metric nobody
    has used yet still declares its type, and Prometheus will see it once it is used)."""
    names: set[str] = set()
    for family in families:
        names.update(family.name + suffix for suffix in _SERIES_SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def metric_modules() -> list[str]:
    """Modules of ``services/`` that use prometheus_client (where metrics are declared)."""
    modules = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        if "prometheus_client" in path.read_text():
            relative = path.relative_to(ROOT).with_suffix("")
            modules.append(".".join(relative.parts))
    return modules


def declared_series() -> set[str]:
    """Series names of every metric the services' code declares, imported in this process."""
    for module in metric_modules():
        importlib.import_module(module)
    return {name for name in series_names(REGISTRY.collect()) if name.startswith("spaces_")}
