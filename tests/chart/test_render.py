"""The chart, rendered by Helm's own engine over a matrix of values: every object validates
against the Kubernetes schemas, lint is clean in strict mode, and what the issue asks of the
objects (labels, probes, security, secrets, autoscaling, budgets, policies, hooks) holds."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import helm_python
import jsonschema
import pytest

from services.media.settings import MediaSettings
from tests.chart.support import (
    CHART_DIR,
    COMPONENTS,
    GRPC_COMPONENTS,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    ROOT,
    STANDARD_LABELS,
    Manifest,
    component_of,
    dashboards,
    deployment,
    env_of,
    manifests_of,
    named,
    of_kind,
    pod_specs,
    render,
    render_files,
    validate,
)

EVERYTHING_ON: dict[str, Any] = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "config": {
        "otlpEndpoint": "http://otel-collector.observability:4317",
        "extra": {"IDENTITY_HOST_MIN_FOLLOWERS": "600"},
    },
    "imagePullSecrets": [{"name": "registry"}],
    "podAnnotations": {"example.org/team": "spaces"},
    "secrets": {
        "notifyFcmAccessToken": {"secretName": "push", "key": "fcm-token"},
        "notifyWebpushVapidPrivateKey": {"secretName": "push", "key": "vapid-key"},
    },
    "identity": {
        "resources": {"requests": {"cpu": "100m"}},
        "autoscaling": {"enabled": True},
        "env": {"IDENTITY_PASSWORD_TIME_COST": "3"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "spaces", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "notify": {"resources": {"requests": {"cpu": "100m"}}, "autoscaling": {"enabled": True}},
    "payments": {"resources": {"requests": {"cpu": "100m"}}, "autoscaling": {"enabled": True}},
    "media": {
        "udp": {"publicIp": "203.0.113.7"},
        "recordings": {"existingClaim": "spaces-recordings"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "media", "operator": "Exists"}]}
                    ]
                }
            }
        },
    },
    "gateway": {"service": {"type": "LoadBalancer", "port": 443}},
    "networkPolicy": {
        "metrics": {"namespaceSelector": {"kubernetes.io/metadata.name": "monitoring"}},
        "gateway": {"namespaceSelector": {"kubernetes.io/metadata.name": "ingress-nginx"}},
        "egress": {
            "postgres": {"port": 5432, "cidr": "10.20.0.0/16"},
            "redis": {"port": 6379, "cidr": "10.30.0.0/16"},
        },
    },
}
EXTERNAL_SECRETS: dict[str, Any] = {
    "secrets": {
        "existingSecret": "prod-spaces",
        "databaseUrl": {"secretName": "pg-app", "key": "uri"},
        "redisUrl": {"secretName": "valkey-auth", "key": "url"},
    }
}
AUTOSCALING_OFF: dict[str, Any] = {
    c: {"autoscaling": {"enabled": False}} for c in ("rooms", "media", "gateway")
}
SERVICE_MONITOR_ON: dict[str, Any] = {"serviceMonitor": {"enabled": True}}
MEDIA_HOST_PORT: dict[str, Any] = {"media": {"udp": {"mode": "hostPort"}}}
MEDIA_LOAD_BALANCER: dict[str, Any] = {
    "media": {
        "replicaCount": 1,
        "autoscaling": {"enabled": False},
        "onePodPerNode": False,
        "udp": {"mode": "loadBalancer", "publicIp": "203.0.113.9"},
    }
}
SOME_OFF: dict[str, Any] = {
    "notify": {"enabled": False},
    "payments": {"enabled": False},
    "networkPolicy": {"enabled": False},
    "grafana": {"dashboards": {"enabled": False}},
    "migrations": {"enabled": False},
    "serviceAccount": {"create": False},
}

MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything-on": EVERYTHING_ON,
    "external-secrets": EXTERNAL_SECRETS,
    "autoscaling-off": AUTOSCALING_OFF,
    "servicemonitor-on": SERVICE_MONITOR_ON,
    "media-hostport": MEDIA_HOST_PORT,
    "media-loadbalancer": MEDIA_LOAD_BALANCER,
    "some-off": SOME_OFF,
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    """Every matrix entry rendered once for the module."""
    return {name: render(values) for name, values in MATRIX.items()}


@pytest.fixture(scope="module")
def defaults(rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    return rendered["defaults"]


# -- the whole matrix -----------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_object_validates_against_the_kubernetes_schemas(
    case: str, rendered: dict[str, list[Manifest]]
) -> None:
    manifests = rendered[case]
    assert manifests
    for manifest in manifests:
        validate(manifest)
    keys = [(m["kind"], m["metadata"]["name"]) for m in manifests]
    assert len(keys) == len(set(keys)), f"duplicate objects in {case}"


def test_validation_rejects_a_wrong_field(defaults: list[Manifest]) -> None:
    """The validator is strict: an unknown field and a wrong type are both caught."""
    manifest = dict(deployment(defaults, "rooms"))
    with pytest.raises(jsonschema.ValidationError):
        validate({**manifest, "spec": {**manifest["spec"], "replica": 2}})
    monitor = named(render(SERVICE_MONITOR_ON), "ServiceMonitor", RELEASE)
    with pytest.raises(jsonschema.ValidationError):
        validate({**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": 9100}]}})


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_lint_is_clean_in_strict_mode(case: str) -> None:
    report = helm_python.lint(CHART_DIR, MATRIX[case], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is INFO (e.g. "icon is recommended"); warnings and errors fail strict lint.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_standard_labels_on_every_object_and_pod(
    case: str, rendered: dict[str, list[Manifest]]
) -> None:
    for manifest in rendered[case]:
        where = f"{case}: {manifest['kind']}/{manifest['metadata']['name']}"
        labels = manifest["metadata"]["labels"]
        for label in STANDARD_LABELS:
            assert labels.get(label), f"{where} lacks {label}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "spaces"
        if manifest["kind"] in ("Deployment", "Job"):
            pod_labels = manifest["spec"]["template"]["metadata"]["labels"]
            assert all(pod_labels.get(label) for label in STANDARD_LABELS), where
            assert pod_labels["app.kubernetes.io/component"] == component_of(manifest)


# -- deployments and services ------------------------------------------------------------


def test_one_deployment_and_service_per_service(defaults: list[Manifest]) -> None:
    for component in COMPONENTS:
        workload = deployment(defaults, component)
        assert component_of(workload) == component
        service = named(defaults, "Service", f"{RELEASE}-{component}")
        selector = service["spec"]["selector"]
        assert service["spec"].get("clusterIP") != "None", "clusterIP cannot change on upgrade"
        if component != "gateway":
            # What the services call: headless, so clients balance over the pods.
            grpc_service = named(defaults, "Service", f"{RELEASE}-{component}-grpc")["spec"]
            assert grpc_service["clusterIP"] == "None"
            assert grpc_service["selector"] == service["spec"]["selector"]
            assert [p["name"] for p in grpc_service["ports"]] == ["grpc"], "scraped once"
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        assert workload["spec"]["selector"]["matchLabels"] == selector
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", f"services.{component}.main"]


def test_a_disabled_service_renders_nothing(rendered: dict[str, list[Manifest]]) -> None:
    for manifest in rendered["some-off"]:
        assert component_of(manifest) not in ("notify", "payments")
    test_pod = of_kind(rendered["some-off"], "Pod")[0]
    assert not any("notify" in arg for arg in test_pod["spec"]["containers"][0]["command"])


def test_commands_run_modules_that_exist(defaults: list[Manifest]) -> None:
    for component in COMPONENTS:
        container = deployment(defaults, component)["spec"]["template"]["spec"]["containers"][0]
        module = container["command"][2]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module


def test_grpc_probes_check_each_service_by_its_health_name(defaults: list[Manifest]) -> None:
    for component in GRPC_COMPONENTS:
        container = deployment(defaults, component)["spec"]["template"]["spec"]["containers"][0]
        grpc_port = next(p for p in container["ports"] if p["name"] == "grpc")["containerPort"]
        expected = f"spaces.{component}.v1.{component.capitalize()}Service"
        proto = (
            ROOT / "protos/spaces" / component / "v1" / f"{component}_service.proto"
        ).read_text()
        assert re.search(rf"^service {component.capitalize()}Service \{{", proto, re.M), expected
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": grpc_port, "service": expected}, probe
    gateway = deployment(defaults, "gateway")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_pods_and_containers_meet_the_restricted_pod_security_level(
    rendered: dict[str, list[Manifest]],
) -> None:
    allowed_volumes = {"emptyDir", "configMap", "secret", "persistentVolumeClaim", "projected"}
    for case in ("defaults", "everything-on", "media-loadbalancer"):
        for name, spec in pod_specs(rendered[case]):
            where = f"{case}: {name}"
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True, where
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
            assert spec["automountServiceAccountToken"] is False, where
            for volume in spec.get("volumes", []):
                assert set(volume) - {"name"} <= allowed_volumes, where
            for container in spec["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["readOnlyRootFilesystem"] is True, where
                assert context["capabilities"] == {"drop": ["ALL"]}, where
                assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, where
                assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
                assert not context.get("privileged"), where
                assert all(not p.get("hostPort") for p in container.get("ports", [])), where


def test_config_checksum_is_the_rendered_configmaps_and_rolls_pods() -> None:
    files = render_files({})
    manifests = manifests_of(files)
    config_text = files["spaces/templates/configmap.yaml"]
    expected = hashlib.sha256(config_text.encode()).hexdigest()
    for component in COMPONENTS:
        annotations = deployment(manifests, component)["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert annotations["checksum/config"] == expected, component
        container = deployment(manifests, component)["spec"]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-config"}}]

    def checksum(values: dict[str, Any]) -> str:
        workload = deployment(render(values), "rooms")
        return str(workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({"config": {"logLevel": "DEBUG"}}) != expected
    # Values outside the ConfigMap leave it, and the pods, alone.
    assert checksum({"rooms": {"replicaCount": 5}}) == expected


# -- secrets and configuration ------------------------------------------------------------

_SECRET_ENV = re.compile(r"(_SECRET|_TOKEN|_KEY|DATABASE_URL|REDIS_URL)$")
_NEEDED_SECRETS = {
    "identity": {
        "SPACES_DATABASE_URL",
        "SPACES_REDIS_URL",
        "SPACES_INTERNAL_SECRET",
        "IDENTITY_KEY_ENCRYPTION_SECRET",
    },
    "rooms": {
        "SPACES_DATABASE_URL",
        "SPACES_REDIS_URL",
        "SPACES_INTERNAL_SECRET",
        "SPACES_MEDIA_GRANT_SECRET",
        "ROOMS_LIVE_RESUME_TOKEN_SECRET",
    },
    "media": {"SPACES_REDIS_URL", "SPACES_INTERNAL_SECRET", "SPACES_MEDIA_GRANT_SECRET"},
    "notify": {"SPACES_DATABASE_URL", "SPACES_REDIS_URL", "SPACES_INTERNAL_SECRET"},
    "payments": {"SPACES_DATABASE_URL", "SPACES_REDIS_URL", "SPACES_INTERNAL_SECRET"},
    "gateway": {"SPACES_REDIS_URL", "SPACES_INTERNAL_SECRET"},
}


def _secret_refs(manifests: list[Manifest], component: str) -> dict[str, tuple[str, str]]:
    container = deployment(manifests, component)["spec"]["template"]["spec"]["containers"][0]
    refs = {}
    for name, entry in env_of(container).items():
        if _SECRET_ENV.search(name):
            assert "value" not in entry, f"{component}: {name} is inlined"
            ref = entry["valueFrom"]["secretKeyRef"]
            refs[name] = (ref["name"], ref["key"])
    return refs


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_secrets_come_only_from_existing_secrets(
    case: str, rendered: dict[str, list[Manifest]]
) -> None:
    manifests = rendered[case]
    assert of_kind(manifests, "Secret") == []
    for configmap in of_kind(manifests, "ConfigMap"):
        assert not any(_SECRET_ENV.search(key) for key in configmap.get("data", {})), configmap
    for component in COMPONENTS:
        if MATRIX[case].get(component, {}).get("enabled") is False:
            continue
        refs = _secret_refs(manifests, component)
        assert _NEEDED_SECRETS[component] <= set(refs), component
        assert set(refs) - _NEEDED_SECRETS[component] <= {
            "NOTIFY_FCM_ACCESS_TOKEN",
            "NOTIFY_WEBPUSH_VAPID_PRIVATE_KEY",
        }


def test_secret_names_and_keys_come_from_values(rendered: dict[str, list[Manifest]]) -> None:
    default_refs = _secret_refs(rendered["defaults"], "rooms")
    assert default_refs["SPACES_DATABASE_URL"] == ("spaces-secrets", "database-url")
    external = _secret_refs(rendered["external-secrets"], "rooms")
    assert external["SPACES_DATABASE_URL"] == ("pg-app", "uri")
    assert external["SPACES_REDIS_URL"] == ("valkey-auth", "url")
    assert external["SPACES_INTERNAL_SECRET"] == ("prod-spaces", "internal-secret")
    job = named(rendered["external-secrets"], "Job", f"{RELEASE}-migrations")
    job_env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    assert job_env["SPACES_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "pg-app",
        "key": "uri",
    }
    push = _secret_refs(rendered["everything-on"], "notify")
    assert push["NOTIFY_FCM_ACCESS_TOKEN"] == ("push", "fcm-token")
    assert "NOTIFY_FCM_ACCESS_TOKEN" not in _secret_refs(rendered["defaults"], "notify")


def test_configmap_wires_addresses_ports_and_otlp(rendered: dict[str, list[Manifest]]) -> None:
    data = named(rendered["defaults"], "ConfigMap", f"{RELEASE}-config")["data"]
    for component in GRPC_COMPONENTS:
        assert data[f"SPACES_{component.upper()}_ADDR"] == f"{RELEASE}-{component}-grpc:50051"
        assert data[f"{component.upper()}_GRPC_PORT"] == "50051"
    assert {data[f"{c.upper()}_METRICS_PORT"] for c in COMPONENTS} == {"9100"}
    assert data["GATEWAY_HTTP_PORT"] == "8080"
    assert "SPACES_OTLP_ENDPOINT" not in data
    configured = named(rendered["everything-on"], "ConfigMap", f"{RELEASE}-config")["data"]
    assert configured["SPACES_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert configured["IDENTITY_HOST_MIN_FOLLOWERS"] == "600"
    for component in COMPONENTS:
        container = deployment(rendered["defaults"], component)["spec"]["template"]["spec"][
            "containers"
        ][0]
        assert env_of(container)["OTEL_SERVICE_NAME"]["value"] == f"spaces-{component}"


# -- scaling and disruption ---------------------------------------------------------------


def test_hpas_for_rooms_gateway_and_media(rendered: dict[str, list[Manifest]]) -> None:
    hpas = of_kind(rendered["defaults"], "HorizontalPodAutoscaler")
    assert sorted(component_of(h) or "" for h in hpas) == ["gateway", "media", "rooms"]
    for hpa in hpas:
        assert hpa["apiVersion"] == "autoscaling/v2"
        component = component_of(hpa) or ""
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": f"{RELEASE}-{component}",
        }
        workload = deployment(rendered["defaults"], component)
        # The HPA owns the replica count; a fixed one would fight it on every upgrade.
        assert "replicas" not in workload["spec"]
        requests = workload["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert requests["cpu"]
    assert of_kind(rendered["autoscaling-off"], "HorizontalPodAutoscaler") == []
    for component in ("rooms", "media", "gateway"):
        assert deployment(rendered["autoscaling-off"], component)["spec"]["replicas"] == 2


def test_autoscaling_without_a_cpu_request_is_refused() -> None:
    with pytest.raises(helm_python.HelmRenderError, match="resources.requests.cpu"):
        # null deletes a default key in Helm (an empty map would merge with it).
        render({"rooms": {"resources": {"requests": None}}})


def test_a_pdb_per_service_selects_its_pods(defaults: list[Manifest]) -> None:
    budgets = of_kind(defaults, "PodDisruptionBudget")
    assert sorted(component_of(b) or "" for b in budgets) == sorted(COMPONENTS)
    for budget in budgets:
        workload = deployment(defaults, component_of(budget) or "")
        assert budget["spec"]["selector"] == workload["spec"]["selector"]
        assert budget["spec"]["maxUnavailable"] == 1
    minimum = render({"rooms": {"podDisruptionBudget": {"enabled": True, "minAvailable": "50%"}}})
    rooms_budget = named(minimum, "PodDisruptionBudget", f"{RELEASE}-rooms")["spec"]
    assert rooms_budget["minAvailable"] == "50%" and "maxUnavailable" not in rooms_budget


# -- network policies -----------------------------------------------------------------------


def _policy(manifests: list[Manifest], component: str) -> dict[str, Any]:
    spec: dict[str, Any] = named(manifests, "NetworkPolicy", f"{RELEASE}-{component}")["spec"]
    return spec


def _ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p["protocol"], p["port"]) for p in rule["ports"]}


def test_network_policies_let_only_gateway_and_media_face_outside(
    defaults: list[Manifest],
) -> None:
    release_pods = {"app.kubernetes.io/name": "spaces", "app.kubernetes.io/instance": RELEASE}
    for component in COMPONENTS:
        policy = _policy(defaults, component)
        pod_labels = deployment(defaults, component)["spec"]["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        open_to_all = {
            port for rule in policy["ingress"] if "from" not in rule for port in _ports(rule)
        }
        # Metrics stay scrapeable (narrowed by networkPolicy.metrics when set).
        expected_open = {("TCP", 9100)}
        if component == "gateway":
            expected_open.add(("TCP", 8080))
        if component == "media":
            expected_open.add(("UDP", 31000))
        assert open_to_all == expected_open, component
        if component != "gateway":
            grpc_rule = next(r for r in policy["ingress"] if ("TCP", 50051) in _ports(r))
            assert grpc_rule["from"] == [{"podSelector": {"matchLabels": release_pods}}]


def test_network_policies_limit_egress(rendered: dict[str, list[Manifest]]) -> None:
    base = {("TCP", 50051), ("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 4317)}
    with_db = base | {("TCP", 5432)}
    expected = {
        "identity": with_db,
        "rooms": with_db,
        "payments": with_db,
        "notify": with_db | {("TCP", 443)},
        "gateway": base,
        "media": base | {("UDP", 1024)},
    }
    for component, ports in expected.items():
        egress = _policy(rendered["defaults"], component)["egress"]
        assert set().union(*(_ports(rule) for rule in egress)) == ports, component
    narrowed = _policy(rendered["everything-on"], "rooms")["egress"]
    postgres = next(r for r in narrowed if ("TCP", 5432) in _ports(r))
    assert postgres["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    metrics = next(
        r
        for r in _policy(rendered["everything-on"], "rooms")["ingress"]
        if ("TCP", 9100) in _ports(r)
    )
    assert metrics["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
    }
    assert of_kind(rendered["some-off"], "NetworkPolicy") == []


# -- media ------------------------------------------------------------------------------------


def _media_container(manifests: list[Manifest]) -> dict[str, Any]:
    container: dict[str, Any] = deployment(manifests, "media")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def test_media_udp_by_node_port_with_one_pod_per_node(defaults: list[Manifest]) -> None:
    udp = named(defaults, "Service", f"{RELEASE}-media-udp")["spec"]
    assert udp["type"] == "NodePort"
    assert udp["externalTrafficPolicy"] == "Local"
    assert udp["ports"] == [
        {
            "name": "webrtc-udp",
            "port": 31000,
            "targetPort": "webrtc-udp",
            "protocol": "UDP",
            "nodePort": 31000,
        }
    ]
    container = _media_container(defaults)
    assert {"name": "webrtc-udp", "containerPort": 31000, "protocol": "UDP"} in container["ports"]
    env = env_of(container)
    # The names MediaSettings reads (env prefix MEDIA_).
    assert env["MEDIA_ICE_ANNOUNCE"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["MEDIA_ICE_PORT"]["value"] == "31000"
    assert env["MEDIA_ICE_HOST"]["value"] == "$(POD_IP)"
    assert env["MEDIA_ADVERTISE_ADDR"]["value"] == "$(POD_IP):50051"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MEDIA_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    pod = deployment(defaults, "media")["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    media_pods = deployment(defaults, "media")["spec"]["selector"]["matchLabels"]
    assert anti == [
        {"labelSelector": {"matchLabels": media_pods}, "topologyKey": "kubernetes.io/hostname"}
    ]
    # Live Spaces drain on SIGTERM; the process stops draining before the kubelet kills it.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= 600
    assert 0 < float(env["MEDIA_DRAIN_GRACE_S"]["value"]) < grace
    rooms_pod = deployment(defaults, "rooms")["spec"]["template"]["spec"]
    assert rooms_pod["terminationGracePeriodSeconds"] == 30


def test_media_settings_named_by_the_chart_exist() -> None:
    """Every MEDIA_ variable the chart sets is a field of MediaSettings."""
    container = _media_container(render({}))
    fields = {f"MEDIA_{name.upper()}" for name in MediaSettings.model_fields}
    set_by_chart = {name for name in env_of(container) if name.startswith("MEDIA_")}
    assert set_by_chart and set_by_chart <= fields, set_by_chart - fields


def test_media_udp_other_modes(rendered: dict[str, list[Manifest]]) -> None:
    host_port = rendered["media-hostport"]
    assert not [s for s in of_kind(host_port, "Service") if s["metadata"]["name"].endswith("-udp")]
    ports = _media_container(host_port)["ports"]
    udp = {"name": "webrtc-udp", "containerPort": 31000, "protocol": "UDP", "hostPort": 31000}
    assert udp in ports

    balanced = rendered["media-loadbalancer"]
    service = named(balanced, "Service", f"{RELEASE}-media-udp")["spec"]
    assert service["type"] == "LoadBalancer" and service["ports"][0]["port"] == 31000
    env = env_of(_media_container(balanced))
    assert env["MEDIA_ICE_ANNOUNCE"]["value"] == "203.0.113.9"
    everything = rendered["everything-on"]
    affinity = deployment(everything, "media")["spec"]["template"]["spec"]["affinity"]
    assert "nodeAffinity" in affinity and "podAntiAffinity" in affinity


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"media": {"onePodPerNode": False}}, "onePodPerNode"),
        ({"media": {"udp": {"mode": "loadBalancer"}}}, "one media pod"),
    ],
)
def test_media_settings_that_cannot_work_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


# -- hooks, monitoring, dashboards, notes ---------------------------------------------------


def test_migration_job_runs_before_install_and_upgrade(defaults: list[Manifest]) -> None:
    job = named(defaults, "Job", f"{RELEASE}-migrations")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    # Hooks run before the release's objects exist: no chart-made ServiceAccount or ConfigMap.
    assert "serviceAccountName" not in pod
    container = pod["containers"][0]
    assert "envFrom" not in container
    assert container["command"] == ["python", "deploy/docker/migrate.py"]
    assert (ROOT / "deploy/docker/migrate.py").exists()


def test_service_monitor_only_when_enabled(rendered: dict[str, list[Manifest]]) -> None:
    assert of_kind(rendered["defaults"], "ServiceMonitor") == []
    manifests = rendered["servicemonitor-on"]
    monitor = named(manifests, "ServiceMonitor", RELEASE)
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    for component in COMPONENTS:
        service = named(manifests, "Service", f"{RELEASE}-{component}")
        assert selector.items() <= service["metadata"]["labels"].items()
        assert "metrics" in [p["name"] for p in service["spec"]["ports"]]
    labelled = named(rendered["everything-on"], "ServiceMonitor", RELEASE)
    assert labelled["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboards_ship_as_labelled_configmaps(rendered: dict[str, list[Manifest]]) -> None:
    boards = dashboards()
    assert set(boards) == {"overview", "media", "rooms", "notify", "payments"}
    shipped = {
        m["metadata"]["name"]: m
        for m in of_kind(rendered["defaults"], "ConfigMap")
        if m["metadata"]["labels"].get("grafana_dashboard") == "1"
    }
    assert len(shipped) == len(boards)
    for stem, board in boards.items():
        configmap = shipped[f"{RELEASE}-dashboard-{stem}"]
        assert json.loads(configmap["data"][f"{stem}.json"]) == board
    assert not [
        m
        for m in of_kind(rendered["some-off"], "ConfigMap")
        if "grafana_dashboard" in m["metadata"]["labels"]
    ]


def test_helm_test_pod_checks_every_service(defaults: list[Manifest]) -> None:
    pod = named(defaults, "Pod", f"{RELEASE}-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "deploy/docker/healthcheck.py"]
    targets = [arg for arg in command if "://" in arg]
    expected = [
        f"grpc://{RELEASE}-{c}:50051/spaces.{c}.v1.{c.capitalize()}Service" for c in GRPC_COMPONENTS
    ]
    assert sorted(targets) == sorted([*expected, f"http://{RELEASE}-gateway:80/healthz"])
    # Its labels let the services' NetworkPolicies admit it.
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert labels["app.kubernetes.io/name"] == "spaces"


def test_notes_tell_how_to_check_and_reach_the_release() -> None:
    notes = render_files(EVERYTHING_ON)["spaces/templates/NOTES.txt"]
    assert f"helm test {RELEASE}" in notes
    assert f"service/{RELEASE}-gateway" in notes
    assert "http://otel-collector.observability:4317" in notes
    assert "spaces-secrets/database-url" in notes
    assert "203.0.113.7" in notes
