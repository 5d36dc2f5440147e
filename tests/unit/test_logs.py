"""Log formatting and redaction."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.common import context
from services.common.logs import JsonFormatter, RedactionFilter, TextFormatter, redact

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactionFilter())
    handler.setFormatter(JsonFormatter("rooms"))
    log = logging.getLogger(f"test.logs.{id(stream)}")
    log.handlers = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return log, stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("authorization: Bearer abc.def-ghi", "abc.def-ghi"),
        (f"token {JWT} leaked", JWT),
        ("password=hunter2 user=bob", "hunter2"),
        ('{"client_secret": "s3cr3t", "x": 1}', "s3cr3t"),
        ("api_key: AKIA123", "AKIA123"),
        ("postgresql://spaces:pa55@db:5432/spaces", "pa55"),
        ("Authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ],
)
def test_redact_text(text: str, secret: str) -> None:
    cleaned = redact(text)
    assert secret not in cleaned
    assert "[REDACTED]" in cleaned


def test_redact_mappings_by_key() -> None:
    cleaned = redact(
        {
            "password": "x",
            "Authorization": "Bearer y",
            "signing_key": "z",
            "nested": {"refresh_token": "t", "title": "hello"},
            "event_key": "spaces/abc",
        }
    )
    assert cleaned == {
        "password": "[REDACTED]",
        "Authorization": "[REDACTED]",
        "signing_key": "[REDACTED]",
        "nested": {"refresh_token": "[REDACTED]", "title": "hello"},
        "event_key": "spaces/abc",
    }


def test_records_are_redacted_everywhere(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = captured
    log.info("login by %s with %s", "bob", {"password": "hunter2"}, extra={"token": JWT})
    log.info("metadata %s", [("authorization", f"Bearer {JWT}")])
    try:
        raise RuntimeError("connect to postgresql://u:topsecret@db failed")
    except RuntimeError:
        log.exception("db down")
    output = stream.getvalue()
    for secret in ("hunter2", JWT, "topsecret"):
        assert secret not in output
    first = lines(stream)[0]
    assert first["token"] == "[REDACTED]"
    assert "bob" in str(first["message"])


def test_json_fields(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = captured
    tracer = TracerProvider().get_tracer("test")
    with (
        context.bind_call(request_id="req-1", timeout=None),
        tracer.start_as_current_span("s") as span,
    ):
        log.warning("joined", extra={"space": "spaces/abc"})
    (entry,) = lines(stream)
    assert entry["level"] == "WARNING"
    assert entry["message"] == "joined"
    assert entry["service"] == "rooms"
    assert entry["request_id"] == "req-1"
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert entry["span_id"] == format(span.get_span_context().span_id, "016x")
    assert entry["space"] == "spaces/abc"
    assert str(entry["timestamp"]).endswith("+00:00")


def test_json_without_call_has_no_ids(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = captured
    log.info("idle")
    (entry,) = lines(stream)
    assert "request_id" not in entry and "trace_id" not in entry


def test_text_format() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    with context.bind_call(request_id="r-9", timeout=None):
        line = TextFormatter("media").format(record)
    assert "media x: hello" in line and "request_id=r-9" in line
