"""Traces across processes: the suite runs with ``SPACES_OTLP_ENDPOINT`` pointed at an
OTLP/gRPC receiver in this test process, and a call through the gateway comes back as one
trace id with spans from the gateway and every backend service it crossed.

The receiver implements ``opentelemetry.proto.collector.trace.v1.TraceService`` (what an
OpenTelemetry Collector serves on 4317), so the services' real exporters talk to it as to a
collector in a cluster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2

from tools.devstack import Stack

SPAN_WAIT_S = 60.0  # only a failing run waits this long; a loaded machine exports late


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened: who sent it and where it sits in its trace."""

    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

    def Export(  # noqa: N802 (the RPC's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = [
            ReceivedSpan(
                service=_service_name(resource_spans),
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                name=span.name,
                kind=span.kind,
            )
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for_services(self, trace_id: str, services: set[str]) -> list[ReceivedSpan]:
        """The spans of ``trace_id`` once every one of ``services`` has sent some, every
        backend among them its server span, and the caller's span each server span
        points to has arrived. Each process exports on its own schedule, and a span is
        exported when it ends: a caller's span after the server span of its call."""
        deadline = time.monotonic() + SPAN_WAIT_S
        backends = services - {"spaces-gateway"}
        while True:
            spans = self.spans(trace_id)
            # The gateway's own server span continues the app's traceparent: its parent
            # is the app's, never exported.
            server_spans = [
                s
                for s in spans
                if s.kind == trace_pb2.Span.SPAN_KIND_SERVER and s.service != "spaces-gateway"
            ]
            ids = {s.span_id for s in spans}
            if (
                services <= {s.service for s in spans}
                and backends <= {s.service for s in server_spans}
                and all(s.parent_span_id in ids for s in server_spans)
            ):
                return spans
            if time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


def _service_name(resource_spans: trace_pb2.ResourceSpans) -> str:
    for attribute in resource_spans.resource.attributes:
        if attribute.key == "service.name":
            return str(attribute.value.string_value)
    return ""


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[TraceReceiver, int]]:
    servicer = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def stack(
    receiver: tuple[TraceReceiver, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    _, port = receiver
    env = {
        "SPACES_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        # Export within a fraction of a second instead of the SDK's 5 s batches.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with Stack(tmp_path_factory.mktemp("traced-stack"), auto_ports=True, extra_env=env) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[httpx.Client]:
    url = f"http://127.0.0.1:{stack.services['gateway'].http_port}"
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def sign_up(gateway: httpx.Client, handle: str) -> str:
    """Create a user through the gateway; return an access token."""
    reply = gateway.post(
        "/v1/users",
        json={
            "user": {"handle": handle, "displayName": handle},
            "password": "correct horse battery",
            "requestId": str(uuid.uuid4()),
        },
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["tokens"]["accessToken"])


def traced_headers(token: str) -> tuple[str, dict[str, str]]:
    """A new trace id, and headers that make the gateway continue that trace (W3C)."""
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    return trace_id, {"Authorization": f"Bearer {token}", "traceparent": traceparent}


def assert_one_connected_trace(spans: list[ReceivedSpan], services: set[str]) -> None:
    """Every service sent spans, and each backend's server span has a parent in the trace."""
    assert services <= {s.service for s in spans}, sorted({(s.service, s.name) for s in spans})
    ids = {s.span_id for s in spans}
    server_spans = [
        s
        for s in spans
        if s.kind == trace_pb2.Span.SPAN_KIND_SERVER and s.service != "spaces-gateway"
    ]
    assert {s.service for s in server_spans} == services - {"spaces-gateway"}
    for span in server_spans:
        assert span.parent_span_id in ids, f"{span.service} {span.name}: parent not in the trace"
    assert not [s for s in spans if "grpc.health" in s.name], "health checks are not traced"


def test_creating_a_space_is_one_trace_across_gateway_rooms_and_identity(
    receiver: tuple[TraceReceiver, int], gateway: httpx.Client
) -> None:
    collected, _ = receiver
    token = sign_up(gateway, "tracedhost1")
    trace_id, headers = traced_headers(token)
    start = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    reply = gateway.post(
        "/v1/spaces",
        headers=headers,
        json={
            "space": {"title": "Traced", "scheduledStartTime": start.isoformat()},
            "requestId": str(uuid.uuid4()),
        },
    )
    assert reply.status_code == 200, reply.text
    expected = {"spaces-gateway", "spaces-rooms", "spaces-identity"}
    spans = collected.wait_for_services(trace_id, expected)
    assert_one_connected_trace(spans, expected)
    names = {(s.service, s.name) for s in spans}
    assert ("spaces-rooms", "/spaces.rooms.v1.RoomsService/CreateSpace") in names
    assert ("spaces-identity", "/spaces.identity.v1.IdentityService/CheckHostEligibility") in names


def test_joining_a_live_space_is_one_trace_through_rooms_identity_and_media(
    receiver: tuple[TraceReceiver, int], gateway: httpx.Client
) -> None:
    collected, _ = receiver
    host = sign_up(gateway, "tracedhost2")
    listener = sign_up(gateway, "tracedlistener2")
    created = gateway.post(
        "/v1/spaces",
        headers={"Authorization": f"Bearer {host}"},
        json={"space": {"title": "Live and traced"}, "requestId": str(uuid.uuid4())},
    )
    assert created.status_code == 200, created.text
    name = created.json()["space"]["name"]
    trace_id, headers = traced_headers(listener)
    joined = gateway.post(
        f"/v1/{name}:join", headers=headers, json={"requestId": str(uuid.uuid4())}
    )
    assert joined.status_code == 200, joined.text
    expected = {"spaces-gateway", "spaces-rooms", "spaces-identity", "spaces-media"}
    spans = collected.wait_for_services(trace_id, expected)
    assert_one_connected_trace(spans, expected)
    assert ("spaces-rooms", "/spaces.rooms.v1.RoomsService/JoinSpace") in {
        (s.service, s.name) for s in spans
    }
