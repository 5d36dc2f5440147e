"""Lifecycle: create live or scheduled, start, end, cancel, idempotency, restart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb

from tests.integration.rooms.harness import RoomsHarness, reason, request_id


def at(delta: timedelta) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + delta)
    return stamp


async def test_live_space_lifecycle(rooms: RoomsHarness) -> None:
    host, listener = await rooms.users(2)
    space = await rooms.create(host, title="Morning show", topics=["news"])
    assert space.state == res.SPACE_STATE_LIVE
    assert space.host == f"users/{host}"
    assert space.participant_counts.host_count == 1
    assert [r.space for r in rooms.media.of("OpenSpace")] == [space.name]

    joined = await rooms.join(space, listener)
    assert joined.participant.role == res.PARTICIPANT_ROLE_LISTENER
    assert joined.media_grant.endpoint.node == "media-1"
    assert not joined.media_grant.may_publish

    ended = await rooms.stub.EndSpace(
        pb.EndSpaceRequest(name=space.name), metadata=rooms.as_user(host)
    )
    assert ended.space.state == res.SPACE_STATE_ENDED
    assert ended.space.end_reason == res.SPACE_END_REASON_HOST_ENDED
    assert [r.space for r in rooms.media.of("CloseSpace")] == [space.name]
    # An ended Space stays readable.
    got = await rooms.stub.GetSpace(
        pb.GetSpaceRequest(name=space.name), metadata=rooms.as_user(listener)
    )
    assert got.space.state == res.SPACE_STATE_ENDED


async def test_scheduled_space_start_and_cancel(rooms: RoomsHarness) -> None:
    host, other = await rooms.users(2)
    space = await rooms.create(host, scheduled_start_time=at(timedelta(hours=2)))
    assert space.state == res.SPACE_STATE_SCHEDULED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.StartSpace(
            pb.StartSpaceRequest(name=space.name), metadata=rooms.as_user(other)
        )
    assert reason(caught.value) == "NOT_HOST"
    started = await rooms.stub.StartSpace(
        pb.StartSpaceRequest(name=space.name), metadata=rooms.as_user(host)
    )
    assert started.space.state == res.SPACE_STATE_LIVE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.CancelSpace(
            pb.CancelSpaceRequest(name=space.name), metadata=rooms.as_user(host)
        )
    assert reason(caught.value) == "SPACE_NOT_SCHEDULED"

    later = await rooms.create(other, scheduled_start_time=at(timedelta(days=1)))
    canceled = await rooms.stub.CancelSpace(
        pb.CancelSpaceRequest(name=later.name), metadata=rooms.as_user(other)
    )
    assert canceled.space.state == res.SPACE_STATE_CANCELED


@pytest.mark.parametrize(
    ("delta", "expected"),
    [(timedelta(minutes=-1), "SCHEDULE_IN_PAST"), (timedelta(days=15), "SCHEDULE_TOO_FAR_AHEAD")],
)
async def test_schedule_bounds(rooms: RoomsHarness, delta: timedelta, expected: str) -> None:
    (host,) = await rooms.users(1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.create(host, scheduled_start_time=at(delta))
    assert reason(caught.value) == expected


async def test_host_already_live(rooms: RoomsHarness) -> None:
    (host,) = await rooms.users(1)
    first = await rooms.create(host)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.create(host)
    assert reason(caught.value) == "HOST_ALREADY_LIVE"
    assert first.id


async def test_create_space_idempotency(rooms: RoomsHarness) -> None:
    (host,) = await rooms.users(1)
    key = request_id()
    request = pb.CreateSpaceRequest(space=res.Space(title="Once"), request_id=key)
    first, second = await asyncio.gather(
        rooms.stub.CreateSpace(request, metadata=rooms.as_user(host)),
        rooms.stub.CreateSpace(request, metadata=rooms.as_user(host)),
    )
    assert first.space.id == second.space.id
    again = await rooms.stub.CreateSpace(request, metadata=rooms.as_user(host))
    assert again.space.id == first.space.id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.CreateSpace(
            pb.CreateSpaceRequest(space=res.Space(title="Other"), request_id=key),
            metadata=rooms.as_user(host),
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(caught.value) == "IDEMPOTENCY_KEY_REUSED"
    assert len(rooms.media.of("OpenSpace")) == 1


async def test_join_space_idempotency(rooms: RoomsHarness) -> None:
    host, listener = await rooms.users(2)
    space = await rooms.create(host)
    key = request_id()
    request = pb.JoinSpaceRequest(name=space.name, request_id=key)
    first = await rooms.stub.JoinSpace(request, metadata=rooms.as_user(listener))
    second = await rooms.stub.JoinSpace(request, metadata=rooms.as_user(listener))
    assert second.media_grant.token == first.media_grant.token
    other = await rooms.create(listener)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.JoinSpace(
            pb.JoinSpaceRequest(name=other.name, request_id=key), metadata=rooms.as_user(listener)
        )
    assert reason(caught.value) == "IDEMPOTENCY_KEY_REUSED"
