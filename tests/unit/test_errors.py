"""ServiceError → google.rpc.Status mapping."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from services.common import errors


def unpack(status: object, kind: type) -> list:  # type: ignore[type-arg]
    found = []
    for detail in status.details:  # type: ignore[attr-defined]
        if detail.Is(kind.DESCRIPTOR):  # type: ignore[attr-defined]
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        (errors.Aborted, grpc.StatusCode.ABORTED),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Internal, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_has_its_code_and_default_reason(
    error_type: type[errors.ServiceError], code: grpc.StatusCode
) -> None:
    status = errors.to_rpc_status(error_type("it broke"), "spaces.rooms")
    assert status.code == code.value[0]
    assert code_pb2.Code.Name(status.code) == code.name
    assert status.message == "it broke"
    (info,) = unpack(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (code.name, "spaces.rooms")


def test_reason_metadata_and_field_violations() -> None:
    error = errors.InvalidArgument(
        "bad space",
        reason="TITLE_TOO_LONG",
        metadata={"limit": "100"},
        field_violations=[("space.title", "at most 100 characters"), ("space.topics[2]", "empty")],
    )
    status = errors.to_rpc_status(error, "spaces.rooms")
    (info,) = unpack(status, error_details_pb2.ErrorInfo)
    assert info.reason == "TITLE_TOO_LONG"
    assert dict(info.metadata) == {"limit": "100"}
    (bad_request,) = unpack(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("space.title", "at most 100 characters"),
        ("space.topics[2]", "empty"),
    ]
    assert unpack(status, error_details_pb2.RetryInfo) == []


def test_rate_limit_has_quota_failure_and_retry_info() -> None:
    error = errors.ResourceExhausted(
        "slow down", quota_subject="user", quota_description="5 per second", retry_after=2.5
    )
    status = errors.to_rpc_status(error, "spaces.rooms")
    (quota,) = unpack(status, error_details_pb2.QuotaFailure)
    assert (quota.violations[0].subject, quota.violations[0].description) == (
        "user",
        "5 per second",
    )
    (retry,) = unpack(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() == 2500


def test_status_converts_for_abort_with_status() -> None:
    status = rpc_status.to_status(errors.to_rpc_status(errors.NotFound("gone"), "spaces.x"))
    assert status.code == grpc.StatusCode.NOT_FOUND
    assert status.details == "gone"
    assert status.trailing_metadata[0][0] == "grpc-status-details-bin"


@pytest.mark.parametrize("reason", ["lower", "TRAILING_", "1LEADING", "A" * 64, "WITH SPACE"])
def test_reasons_must_be_upper_snake(reason: str) -> None:
    with pytest.raises(ValueError):
        errors.NotFound("x", reason=reason)


def test_nul_characters_are_found_in_nested_and_repeated_strings() -> None:
    from spaces.rooms.v1 import rooms_resources_pb2 as res
    from spaces.rooms.v1 import rooms_service_pb2 as rooms_pb

    from services.common.interceptors.validation import nul_fields

    clean = rooms_pb.CreateSpaceRequest(space=res.Space(title="Jazz", topics=["music"]))
    assert nul_fields(clean) == []
    dirty = rooms_pb.CreateSpaceRequest(
        space=res.Space(title="a\x00b", topics=["ok", "x\x00"]), request_id="r\x00"
    )
    assert sorted(nul_fields(dirty)) == ["request_id", "space.title", "space.topics"]
