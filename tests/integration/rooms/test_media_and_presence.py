"""Media sees every permission change at once; absent hosts end their Spaces."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import jwt
import pytest
import redis.asyncio
from google.protobuf import timestamp_pb2
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb

from services.common.events import StreamEvent, stream_name
from services.common.grants import MediaGrantVerifier
from tests.integration.rooms.harness import GRANT_SECRET, RoomsHarness, running_rooms, started_rooms

BUDGET_S = 0.2


def now_pb() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


async def test_join_grant_is_signed_for_media(rooms: RoomsHarness) -> None:
    host, listener = await rooms.users(2)
    space = await rooms.create(host)
    host_join = await rooms.join(space, host)
    listener_join = await rooms.join(space, listener)
    verifier = MediaGrantVerifier(GRANT_SECRET)
    host_grant = verifier.verify(host_join.media_grant.token)
    assert (host_grant.space_id, host_grant.user_id, host_grant.role) == (space.id, host, "host")
    assert host_grant.may_publish and host_grant.node == "media-1"
    grant = verifier.verify(listener_join.media_grant.token)
    assert (grant.role, grant.may_publish) == ("listener", False)
    claims = jwt.decode(listener_join.media_grant.token, options={"verify_signature": False})
    assert 0 < claims["exp"] - claims["iat"] <= 120
    placed = rooms.media.of("PlaceParticipant")
    assert [p.may_publish for p in placed] == [True, False]


async def _timed(rooms: RoomsHarness, call: object, participant: str, check: object) -> float:
    """Seconds from the rooms call to media holding permissions that pass ``check``."""
    started = time.monotonic()
    await call  # type: ignore[misc]
    arrived = await rooms.media.wait_for(
        lambda: (
            participant in rooms.media.permissions and check(rooms.media.permissions[participant])
        ),  # type: ignore[operator]
        timeout=2.0,
    )
    return arrived - started


async def test_permission_changes_reach_media_within_200ms(rooms: RoomsHarness) -> None:
    host, speaker, listener = await rooms.users(3)
    space = await rooms.create(host)
    await rooms.join(space, speaker)
    await rooms.join(space, listener)
    name = f"{space.name}/participants/{speaker}"
    as_host = rooms.as_user(host)

    await rooms.stub.RequestToSpeak(
        pb.RequestToSpeakRequest(name=space.name), metadata=rooms.as_user(speaker)
    )
    elapsed = await _timed(
        rooms,
        rooms.stub.ApproveSpeaker(pb.ApproveSpeakerRequest(name=name), metadata=as_host),
        name,
        lambda p: p.may_publish and p.muted,
    )
    assert elapsed < BUDGET_S
    elapsed = await _timed(
        rooms,
        rooms.stub.SetOwnMute(
            pb.SetOwnMuteRequest(name=space.name, muted=False), metadata=rooms.as_user(speaker)
        ),
        name,
        lambda p: p.may_publish and not p.muted,
    )
    assert elapsed < BUDGET_S
    elapsed = await _timed(
        rooms,
        rooms.stub.MuteParticipant(pb.MuteParticipantRequest(name=name), metadata=as_host),
        name,
        lambda p: p.muted,
    )
    assert elapsed < BUDGET_S
    elapsed = await _timed(
        rooms,
        rooms.stub.RevokeSpeaker(pb.RevokeSpeakerRequest(name=name), metadata=as_host),
        name,
        lambda p: not p.may_publish,
    )
    assert elapsed < BUDGET_S
    listener_name = f"{space.name}/participants/{listener}"
    elapsed = await _timed(
        rooms,
        rooms.stub.RemoveParticipant(
            pb.RemoveParticipantRequest(name=listener_name), metadata=as_host
        ),
        listener_name,
        lambda p: p.removed,
    )
    assert elapsed < BUDGET_S
    # Revisions only go up, so media can drop anything stale.
    revisions = [r.revision for r in rooms.media.of("UpdatePermissions") if r.participant == name]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)


@pytest.fixture
async def quick_rooms(database_url: str, redis_url: str) -> AsyncIterator[RoomsHarness]:
    """Rooms whose host-absence grace is a few hundred milliseconds."""
    async with running_rooms(
        database_url, redis_url, host_absence_grace=0.3, sweep_interval_s=0.05
    ) as running:
        yield running


async def report(
    rooms: RoomsHarness, space: res.Space, user: str, state: int, session: str = "s1"
) -> None:
    await rooms.stub.ReportPeerStates(
        pb.ReportPeerStatesRequest(
            node="mediaNodes/media-1",
            changes=[
                pb.PeerStateChange(
                    participant=f"{space.name}/participants/{user}",
                    media_session=f"mediaNodes/media-1/sessions/{session}",
                    state=state,  # type: ignore[arg-type]
                    observe_time=now_pb(),
                )
            ],
        ),
        metadata=rooms.as_service,
    )


async def wait_state(
    rooms: RoomsHarness, space: res.Space, host: str, timeout: float = 3.0
) -> res.Space:
    deadline = time.monotonic() + timeout
    while True:
        got = (
            await rooms.stub.GetSpace(
                pb.GetSpaceRequest(name=space.name), metadata=rooms.as_user(host)
            )
        ).space
        if got.state != res.SPACE_STATE_LIVE or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


async def test_absent_host_ends_the_space_once_across_replicas(quick_rooms: RoomsHarness) -> None:
    rooms = quick_rooms
    host, stays = await rooms.users(2)
    space = await rooms.create(host)
    kept = await rooms.create(stays)
    await report(rooms, space, host, pb.PEER_STATE_CONNECTED)
    await report(rooms, kept, stays, pb.PEER_STATE_CONNECTED)
    async with started_rooms(rooms.common, host_absence_grace=0.3, sweep_interval_s=0.05):
        await report(rooms, space, host, pb.PEER_STATE_DISCONNECTED)
        ended = await wait_state(rooms, space, host)
        assert ended.state == res.SPACE_STATE_ENDED
        assert ended.end_reason == res.SPACE_END_REASON_HOST_ABSENT
        await asyncio.sleep(0.3)
    # A connected host's Space goes on.
    assert (await wait_state(rooms, kept, stays, timeout=0.1)).state == res.SPACE_STATE_LIVE
    assert [r.space for r in rooms.media.of("CloseSpace")] == [space.name]
    client = redis.asyncio.Redis.from_url(rooms.common.redis_url)
    try:
        deadline = time.monotonic() + 3
        while True:
            entries = await client.xrange(stream_name("rooms"))
            events = [StreamEvent.from_entry(i, f) for i, f in entries]
            ended_events = [e for e in events if e.type == "space.ended"]
            if ended_events or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    assert [e.key for e in ended_events] == [space.name]


async def test_host_back_within_grace_keeps_the_space(quick_rooms: RoomsHarness) -> None:
    rooms = quick_rooms
    (host,) = await rooms.users(1)
    space = await rooms.create(host)
    await report(rooms, space, host, pb.PEER_STATE_DISCONNECTED)
    await asyncio.sleep(0.1)
    await report(rooms, space, host, pb.PEER_STATE_CONNECTED, session="s2")
    await asyncio.sleep(0.5)
    got = await wait_state(rooms, space, host, timeout=0.1)
    assert got.state == res.SPACE_STATE_LIVE


async def test_coming_on_stage_from_an_edge_node_moves_to_the_origin(rooms: RoomsHarness) -> None:
    host, listener = await rooms.users(2)
    space = await rooms.create(host)
    await rooms.join(space, listener)
    await report(rooms, space, listener, pb.PEER_STATE_CONNECTED, session="edge1")
    await rooms.stub.ReportPeerStates(
        pb.ReportPeerStatesRequest(
            node="mediaNodes/media-2",
            changes=[
                pb.PeerStateChange(
                    participant=f"{space.name}/participants/{listener}",
                    media_session="mediaNodes/media-2/sessions/edge2",
                    state=pb.PEER_STATE_CONNECTED,
                    observe_time=now_pb(),
                )
            ],
        ),
        metadata=rooms.as_service,
    )
    stream = rooms.stub.WatchSpace(
        pb.WatchSpaceRequest(name=space.name), metadata=rooms.as_user(listener)
    )
    kinds: list[str] = []
    grant_token = ""

    async def read() -> None:
        nonlocal grant_token
        async for response in stream:
            for event in response.events:
                kinds.append(event.WhichOneof("event") or "")
                if event.HasField("media_reconnect"):
                    grant_token = event.media_reconnect.media_grant.token
                    return

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.2)
    await rooms.stub.InviteToSpeak(
        pb.InviteToSpeakRequest(name=f"{space.name}/participants/{listener}"),
        metadata=rooms.as_user(host),
    )
    await rooms.stub.AcceptSpeakInvitation(
        pb.AcceptSpeakInvitationRequest(name=space.name), metadata=rooms.as_user(listener)
    )
    await asyncio.wait_for(reader, 3)
    stream.cancel()
    grant = MediaGrantVerifier(GRANT_SECRET).verify(grant_token)
    assert (grant.node, grant.may_publish, grant.role) == ("media-1", True, "speaker")


async def test_request_media_reconnect_sends_fresh_grants(rooms: RoomsHarness) -> None:
    host, listener, outsider = await rooms.users(3)
    space = await rooms.create(host)
    await rooms.join(space, listener)
    response = await rooms.stub.RequestMediaReconnect(
        pb.RequestMediaReconnectRequest(
            name=space.name,
            participants=[f"{space.name}/participants/{u}" for u in (listener, outsider)],
            reason=1,  # type: ignore[arg-type]
            from_node="mediaNodes/media-1",
        ),
        metadata=rooms.as_service,
    )
    assert response.notified_count == 1
    placed = rooms.media.of("PlaceParticipant")[-1]
    assert placed.avoid_node == "mediaNodes/media-1"
