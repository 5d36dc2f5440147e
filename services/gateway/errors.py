"""gRPC statuses as HTTP answers, the way grpc-gateway renders them.

The HTTP status follows grpc-gateway's ``runtime.HTTPStatusFromCode``; the body is the
``google.rpc.Status`` in proto3 JSON, details included (each an ``Any`` with ``@type``), so
clients switch on ``ErrorInfo.reason`` exactly as gRPC clients do. ``Retry-After`` comes from
a ``RetryInfo`` detail on 429 and 503.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from starlette.responses import Response

logger = logging.getLogger(__name__)

__all__ = [
    "DOMAIN",
    "GatewayError",
    "http_status_of",
    "retry_after_s",
    "status_from_rpc_error",
    "status_json",
    "status_response",
]

DOMAIN = "spaces.gateway"

# grpc-gateway runtime.HTTPStatusFromCode, code by code.
_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    # Deliberately not 412 Precondition Failed, which is about HTTP conditional headers.
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def http_status_of(code: grpc.StatusCode | int) -> int:
    """The HTTP status grpc-gateway gives ``code`` (500 for a code it does not know)."""
    if isinstance(code, int):
        found = _CODE_BY_VALUE.get(code)
        if found is None:
            return 500
        code = found
    return _HTTP_STATUS.get(code, 500)


class GatewayError(Exception):
    """A refusal by the gateway itself (bad path, body too large, rate limit...).

    :param code: the canonical code; the HTTP status follows from it unless ``http_status``.
    :param message: developer-facing description.
    :param reason: stable ErrorInfo reason.
    :param details: further ``google.rpc`` details (BadRequest, QuotaFailure, RetryInfo).
    :param http_status: an HTTP status to use instead (413, 405, 416 have no gRPC code).
    :param headers: extra response headers (``Allow``, ``Retry-After``).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str,
        details: Sequence[Message] = (),
        http_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status_pb2.Status(code=code.value[0], message=message)
        self.status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
        for detail in details:
            self.status.details.add().Pack(detail)
        self.http_status = http_status or http_status_of(code)
        self.headers = dict(headers or {})

    @classmethod
    def bad_request(cls, message: str, *, field: str = "", reason: str) -> GatewayError:
        """An INVALID_ARGUMENT with a ``BadRequest`` field violation when ``field`` is set."""
        details: list[Message] = []
        if field:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=field, description=message
            )
            details.append(error_details_pb2.BadRequest(field_violations=[violation]))
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message, reason=reason, details=details)

    def response(self) -> Response:
        """The HTTP answer."""
        return status_response(self.status, http_status=self.http_status, headers=self.headers)


# Statuses gRPC itself produces (no backend reached, deadline passed...): their messages
# name internal addresses, so clients get a fixed text and a reason instead.
_TRANSPORT_FAILURES: dict[grpc.StatusCode, tuple[str, str]] = {
    grpc.StatusCode.UNAVAILABLE: ("BACKEND_UNAVAILABLE", "the service is unavailable; retry"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (
        "DEADLINE_EXCEEDED",
        "the service did not answer before the deadline",
    ),
    grpc.StatusCode.CANCELLED: ("CANCELLED", "the call was cancelled"),
    grpc.StatusCode.UNKNOWN: ("BACKEND_ERROR", "the service failed"),
    grpc.StatusCode.INTERNAL: ("BACKEND_ERROR", "the service failed"),
}


def status_from_rpc_error(error: grpc.RpcError) -> status_pb2.Status:
    """The full ``google.rpc.Status`` of a failed backend call (details included).

    A status without details did not come from a Spaces service (whose error interceptor
    always sends ErrorInfo) but from gRPC itself; for transport failures its message is
    replaced (and logged), since it names internal addresses.
    """
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        # The status details disagree with the call's code or message: trust the call.
        logger.warning("inconsistent grpc-status-details-bin from a backend")
        status = None
    if status is not None:
        return status
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else ""
    transport = _TRANSPORT_FAILURES.get(code)
    if transport is None:
        return status_pb2.Status(code=code.value[0], message=details or "")
    logger.warning("backend call failed: %s: %s", code.name, details)
    reason, message = transport
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    return status


def _detail_json(detail: any_pb2.Any) -> dict[str, Any]:
    try:
        rendered: dict[str, Any] = json_format.MessageToDict(detail)
        return rendered
    except (TypeError, KeyError, json_format.Error):
        # A detail type this process does not know: pass it on undecoded, as Any's JSON
        # mapping does for unknown types in other runtimes.
        return {"@type": detail.type_url, "value": detail.value.hex()}


def status_json(status: status_pb2.Status) -> dict[str, Any]:
    """The proto3 JSON of ``status``; details render one by one so one bad detail is kept."""
    return {
        "code": status.code,
        "message": status.message,
        "details": [_detail_json(d) for d in status.details],
    }


def retry_after_s(status: status_pb2.Status) -> int | None:
    """Whole seconds of the status's ``RetryInfo`` delay (rounded up), if it has one."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            # From seconds and nanos directly: a timedelta would drop sub-microsecond parts.
            nanos = int(info.retry_delay.seconds) * 1_000_000_000 + int(info.retry_delay.nanos)
            return max(0, math.ceil(nanos / 1_000_000_000))
    return None


def status_response(
    status: status_pb2.Status,
    *,
    http_status: int | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A JSON ``google.rpc.Status`` answer with the status grpc-gateway would give."""
    code = http_status or http_status_of(status.code)
    out = dict(headers or {})
    if code in (429, 503) and "Retry-After" not in out:
        delay = retry_after_s(status)
        if delay is not None:
            out["Retry-After"] = str(delay)
    body = json.dumps(status_json(status), separators=(",", ":"), ensure_ascii=False)
    return Response(body, status_code=code, headers=out, media_type="application/json")
