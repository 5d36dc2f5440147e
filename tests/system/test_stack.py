"""``make up``'s launcher: every built service starts as its own process and reports SERVING.

The stack runs on free ports in a temporary folder, beside any ``make up`` a developer has
running, with its own embedded PostgreSQL and Valkey.
"""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.devstack import SERVICES, ServiceDied, Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir: Path = tmp_path_factory.mktemp("stack")
    with Stack(run_dir, auto_ports=True) as running:
        yield running


def test_every_built_service_is_started(stack: Stack) -> None:
    built = [spec.name for spec in SERVICES if spec.is_built()]
    assert sorted(stack.services) == sorted(built)


def test_grpc_services_report_serving_per_service_name(stack: Stack) -> None:
    for running in stack.services.values():
        if running.grpc_port is None:
            continue
        with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert overall.status == health_pb2.HealthCheckResponse.SERVING
            package = f"spaces.{running.spec.service}.v1"
            service_name = f"{package}.{running.spec.service.capitalize()}Service"
            named = health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=5)
            assert named.status == health_pb2.HealthCheckResponse.SERVING, service_name


def test_metrics_endpoints_answer(stack: Stack) -> None:
    for running in stack.services.values():
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = reply.read().decode()
        assert reply.status == 200
        assert "python_info" in body or "process_cpu_seconds_total" in body, running.spec.name


def test_table_names_every_service_and_store(stack: Stack) -> None:
    table = stack.table()
    for name in [*stack.services, "postgres", "valkey"]:
        assert name in table


def test_a_service_that_dies_is_reported(stack: Stack) -> None:
    assert stack.services, "identity is always built, so something can die"
    name = next(iter(stack.services))
    victim = stack.services[name]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    with pytest.raises(ServiceDied, match=name):
        stack.check_alive()
    # Bring it back so the module's other tests (in any order) see a whole stack.
    stack.start_service(name)
    stack.check_alive()
