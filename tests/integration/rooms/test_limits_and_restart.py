"""Stage limits under concurrency, and durability across a restart of every rooms process."""

from __future__ import annotations

import asyncio

import grpc
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as pb_grpc

from tests.integration.rooms.harness import RoomsHarness, reason, started_rooms


async def test_fifty_simultaneous_approvals_make_exactly_ten_speakers(rooms: RoomsHarness) -> None:
    host, *listeners = await rooms.users(51)
    space = await rooms.create(host)
    await asyncio.gather(*(rooms.join(space, u) for u in listeners))
    await asyncio.gather(
        *(
            rooms.stub.RequestToSpeak(
                pb.RequestToSpeakRequest(name=space.name), metadata=rooms.as_user(u)
            )
            for u in listeners
        )
    )
    results = await asyncio.gather(
        *(
            rooms.stub.ApproveSpeaker(
                pb.ApproveSpeakerRequest(name=f"{space.name}/participants/{u}"),
                metadata=rooms.as_user(host),
            )
            for u in listeners
        ),
        return_exceptions=True,
    )
    approved = [r for r in results if isinstance(r, pb.ApproveSpeakerResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(approved) == 10
    assert len(refused) == 40
    assert {reason(e) for e in refused} == {"SPEAKER_LIMIT_REACHED"}
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    rows = await rooms.sql(
        "SELECT count(*) FROM participants WHERE space_id = %s AND active AND role = 3", space.id
    )
    assert rows == [(10,)]
    got = await rooms.stub.GetSpace(
        pb.GetSpaceRequest(name=space.name), metadata=rooms.as_user(host)
    )
    assert got.space.participant_counts.speaker_count == 10
    assert got.space.participant_counts.listener_count == 40


async def test_co_host_limit_holds_under_concurrent_accepts(rooms: RoomsHarness) -> None:
    host, *candidates = await rooms.users(6)
    space = await rooms.create(host)
    await asyncio.gather(*(rooms.join(space, u) for u in candidates))
    for user in candidates:
        await rooms.stub.AddCoHost(
            pb.AddCoHostRequest(name=f"{space.name}/participants/{user}"),
            metadata=rooms.as_user(host),
        )
    results = await asyncio.gather(
        *(
            rooms.stub.AcceptCoHostInvitation(
                pb.AcceptCoHostInvitationRequest(name=space.name), metadata=rooms.as_user(u)
            )
            for u in candidates
        ),
        return_exceptions=True,
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) == 2
    assert {reason(e) for e in refused} == {"CO_HOST_LIMIT_REACHED"}
    got = await rooms.stub.GetSpace(
        pb.GetSpaceRequest(name=space.name), metadata=rooms.as_user(host)
    )
    assert len(got.space.co_hosts) == 2
    # The refused ones keep their pending invitation (the contract says it stays).
    loser = next(
        u for u, r in zip(candidates, results, strict=True) if isinstance(r, BaseException)
    )
    participant = await rooms.participant(space, loser)
    assert participant.pending_invitation.kind == res.INVITATION_KIND_CO_HOST


async def test_restart_keeps_spaces_roles_and_hands(rooms: RoomsHarness) -> None:
    host, co_host, speaker, hand, listener = await rooms.users(5)
    space = await rooms.create(host, title="Durable")
    for user in (co_host, speaker, hand, listener):
        await rooms.join(space, user)
    await rooms.make_co_host(space, host, co_host)
    await rooms.make_speaker(space, host, speaker)
    await rooms.stub.RequestToSpeak(
        pb.RequestToSpeakRequest(name=space.name), metadata=rooms.as_user(hand)
    )

    # Every rooms process goes away; a new one starts on the same database and Redis.
    await rooms.service.stop(grace=0)
    async with started_rooms(rooms.common) as (_service, _runtime, channel):
        stub = pb_grpc.RoomsServiceStub(channel)
        got = await stub.GetSpace(pb.GetSpaceRequest(name=space.name), metadata=rooms.as_user(host))
        assert got.space.state == res.SPACE_STATE_LIVE
        assert got.space.title == "Durable"
        assert list(got.space.co_hosts) == [f"users/{co_host}"]
        listed = await stub.ListParticipants(
            pb.ListParticipantsRequest(parent=space.name), metadata=rooms.as_user(host)
        )
        roles = {p.user.removeprefix("users/"): p.role for p in listed.participants}
        assert roles == {
            host: res.PARTICIPANT_ROLE_HOST,
            co_host: res.PARTICIPANT_ROLE_CO_HOST,
            speaker: res.PARTICIPANT_ROLE_SPEAKER,
            hand: res.PARTICIPANT_ROLE_LISTENER,
            listener: res.PARTICIPANT_ROLE_LISTENER,
        }
        hands = await stub.ListParticipants(
            pb.ListParticipantsRequest(parent=space.name, hand_raised_only=True),
            metadata=rooms.as_user(co_host),
        )
        assert [p.user for p in hands.participants] == [f"users/{hand}"]
        # And the new process keeps working on the old state.
        approved = await stub.ApproveSpeaker(
            pb.ApproveSpeakerRequest(name=f"{space.name}/participants/{hand}"),
            metadata=rooms.as_user(host),
        )
        assert approved.participant.role == res.PARTICIPANT_ROLE_SPEAKER
