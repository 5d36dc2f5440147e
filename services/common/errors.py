"""The errors services raise, and their translation into ``google.rpc.Status``.

Servicers and domain code raise a :class:`ServiceError` subclass; the error interceptor turns
it into a gRPC status with the standard ``google.rpc`` details (AIP-193):

* ``ErrorInfo`` always, with a stable UPPER_SNAKE ``reason`` that clients switch on and a
  ``domain`` naming the service (``spaces.rooms``);
* ``BadRequest`` when there are field violations;
* ``RetryInfo`` when the caller may retry after a delay;
* ``QuotaFailure`` for rate limits (``ResourceExhausted``).

Messages are for developers; they must never contain secrets or other users' data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import ClassVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_info",
    "to_rpc_status",
]

# google.rpc.ErrorInfo: "[A-Z][A-Z0-9_]+[A-Z0-9]", at most 63 characters.
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,61}[A-Z0-9]$")


class ServiceError(Exception):
    """An expected failure with a canonical gRPC code and a stable reason.

    :param message: developer-facing description, sent as the status message.
    :param reason: stable UPPER_SNAKE identifier of the cause; defaults to the class's.
    :param metadata: extra ErrorInfo context (e.g. ``{"space": "spaces/abc"}``).
    :param field_violations: ``(field path, description)`` pairs for ``BadRequest``.
    :param retry_after: how long the caller should wait before retrying (``RetryInfo``).
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after: timedelta | float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        if not _REASON.match(self.reason):
            raise ValueError(f"error reason must be UPPER_SNAKE_CASE: {self.reason!r}")
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        if isinstance(retry_after, (int, float)):
            retry_after = timedelta(seconds=retry_after)
        self.retry_after: timedelta | None = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class InvalidArgument(ServiceError):
    """The request is malformed, whatever the state of the system (400)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class FailedPrecondition(ServiceError):
    """The system is not in a state the request needs, e.g. the Space has ended (400)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unauthenticated(ServiceError):
    """No valid credentials were presented (401)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """The caller is known but may not do this (403)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(ServiceError):
    """The resource does not exist, or is hidden from the caller (404)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """The resource the request would create exists already (409)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class Aborted(ServiceError):
    """A concurrency conflict (lost a race, idempotency key in use); retry the whole flow (409)."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class ResourceExhausted(ServiceError):
    """A quota or rate limit was hit (429); sent with ``QuotaFailure`` and ``RetryInfo``.

    :param quota_subject: what the limit applies to, e.g. ``"user"`` or ``"space"``; never
        an id of another user.
    :param quota_description: which limit, e.g. ``"5 reactions per second"``.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        quota_subject: str = "",
        quota_description: str = "",
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after: timedelta | float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, retry_after=retry_after)
        self.quota_subject = quota_subject
        self.quota_description = quota_description or message


class OutOfRange(ServiceError):
    """A position past the end of something that exists, e.g. a read offset (416 at HTTP)."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class Unimplemented(ServiceError):
    """The method exists in the API but this server version does not serve it (501)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Unavailable(ServiceError):
    """Transient: the service or a dependency cannot serve now; safe to retry (503)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    """The call's deadline passed before the work finished (504)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Internal(ServiceError):
    """A broken invariant. Prefer letting unexpected exceptions propagate (500)."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


def to_rpc_status(error: ServiceError, domain: str) -> status_pb2.Status:
    """Build the ``google.rpc.Status`` (with details) describing ``error``.

    :param error: the error to describe.
    :param domain: the ErrorInfo domain, ``spaces.<service>``.
    """
    code_value: int = error.code.value[0]
    status = status_pb2.Status(code=code_value, message=error.message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
    )
    if error.field_violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in error.field_violations
            ]
        )
        status.details.add().Pack(bad_request)
    if isinstance(error, ResourceExhausted):
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=error.quota_subject, description=error.quota_description
                )
            ]
        )
        status.details.add().Pack(quota)
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(error.retry_after)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Return the ``ErrorInfo`` detail of a failed call to another service, if it has one.

    Callers switch on ``error_info(e).reason`` rather than on message text.
    """
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
