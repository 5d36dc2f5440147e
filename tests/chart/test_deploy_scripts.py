"""The scripts the chart runs from the image: the migration Job's and the ``helm test`` pod's,
run for real (a real PostgreSQL; real gRPC health and HTTP servers)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import psycopg
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.chart.support import ROOT

MIGRATE = ROOT / "deploy" / "docker" / "migrate.py"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"


def run_script(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_applies_every_schema(database_url: str) -> None:
    first = run_script(str(MIGRATE), env={"SPACES_DATABASE_URL": database_url})
    assert first.returncode == 0, first.stderr
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT table_schema FROM information_schema.tables"
            " WHERE table_name = 'schema_migrations' ORDER BY 1"
        ).fetchall()
    assert [row[0] for row in rows] == ["identity", "notify", "payments", "rooms"]
    for schema in ("identity", "notify", "payments", "rooms"):
        assert f"schema {schema}: " in first.stderr


def test_migrate_without_a_database_url_fails() -> None:
    result = run_script(str(MIGRATE), env={"SPACES_DATABASE_URL": ""})
    assert result.returncode == 2
    assert "SPACES_DATABASE_URL is not set" in result.stderr


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads the script's output, not the server's."""


@pytest.fixture
def grpc_health_port() -> Iterator[int]:
    """A gRPC server whose health says rooms is SERVING and payments NOT_SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("spaces.rooms.v1.RoomsService", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("spaces.payments.v1.PaymentsService", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_passes_when_every_target_is_healthy(
    grpc_health_port: int, http_port: int
) -> None:
    result = run_script(
        str(HEALTHCHECK),
        "--timeout",
        "5",
        f"grpc://127.0.0.1:{grpc_health_port}/spaces.rooms.v1.RoomsService",
        f"http://127.0.0.1:{http_port}/healthz",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 2


def test_healthcheck_fails_and_names_each_unhealthy_target(
    grpc_health_port: int, http_port: int
) -> None:
    result = run_script(
        str(HEALTHCHECK),
        "--timeout",
        "0.5",
        f"grpc://127.0.0.1:{grpc_health_port}/spaces.rooms.v1.RoomsService",
        f"grpc://127.0.0.1:{grpc_health_port}/spaces.payments.v1.PaymentsService",
        f"grpc://127.0.0.1:{grpc_health_port}/spaces.unknown.v1.UnknownService",
        f"http://127.0.0.1:{http_port}/missing",
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok ")
    assert lines[1].startswith("FAIL ") and lines[1].endswith("NOT_SERVING")
    assert lines[2].startswith("FAIL ") and "NOT_FOUND" in lines[2]
    assert lines[3].startswith("FAIL ") and lines[3].endswith("HTTP 404")
