"""Who sees and joins a Space: visibility, invitations, join links, blocks, tickets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb

from services.rooms.tokens import JoinLinks
from tests.integration.rooms.harness import RoomsHarness, reason


async def expect(reason_: str, call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert reason(caught.value) == reason_
    return caught.value


async def get(rooms: RoomsHarness, space: res.Space, user: str, link: str = "") -> res.Space:
    response = await rooms.stub.GetSpace(
        pb.GetSpaceRequest(name=space.name, join_link_token=link), metadata=rooms.as_user(user)
    )
    return response.space


async def test_followers_only(rooms: RoomsHarness) -> None:
    host, followed, stranger = await rooms.users(3)
    await rooms.follow(host, followed)
    space = await rooms.create(host, visibility=res.SPACE_VISIBILITY_FOLLOWED_BY_HOST)
    assert (await get(rooms, space, followed)).id == space.id
    await rooms.join(space, followed)
    error = await expect("SPACE_NOT_FOUND", get(rooms, space, stranger))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    await expect("SPACE_NOT_FOUND", rooms.join(space, stranger))
    # Following the host is not enough: the host must follow you.
    await rooms.follow(stranger, host)
    await expect("SPACE_NOT_FOUND", rooms.join(space, stranger))


async def test_invite_only_by_invitation(rooms: RoomsHarness) -> None:
    host, guest, stranger = await rooms.users(3)
    space = await rooms.create(host, visibility=res.SPACE_VISIBILITY_INVITED_ONLY)
    await expect("SPACE_NOT_FOUND", rooms.join(space, guest))
    invited = await rooms.stub.InviteUsers(
        pb.InviteUsersRequest(name=space.name, users=[f"users/{guest}"]),
        metadata=rooms.as_user(host),
    )
    assert invited.invited_user_count == 1
    joined = await rooms.join(space, guest)
    assert joined.participant.role == res.PARTICIPANT_ROLE_LISTENER
    await expect("SPACE_NOT_FOUND", get(rooms, space, stranger))


async def test_invite_only_by_join_link(rooms: RoomsHarness) -> None:
    host, holder, stranger = await rooms.users(3)
    space = await rooms.create(host, visibility=res.SPACE_VISIBILITY_INVITED_ONLY)
    other = await rooms.create(stranger)
    link = (
        await rooms.stub.CreateJoinLink(
            pb.CreateJoinLinkRequest(name=space.name), metadata=rooms.as_user(host)
        )
    ).join_link
    assert link.uri.endswith(link.token)
    assert (await get(rooms, space, holder, link.token)).id == space.id
    await rooms.join(space, holder, link.token)

    # Forged: the signature does not match. For another Space: also invalid.
    body, _, mac = link.token.partition(".")
    forged = f"{body}.{mac[::-1]}"
    await expect("JOIN_LINK_INVALID", get(rooms, space, stranger, forged))
    await expect("JOIN_LINK_INVALID", rooms.join(space, stranger, "garbage"))
    other_link = (
        await rooms.stub.CreateJoinLink(
            pb.CreateJoinLinkRequest(name=other.name), metadata=rooms.as_user(stranger)
        )
    ).join_link
    await expect("JOIN_LINK_INVALID", rooms.join(space, stranger, other_link.token))

    # Expired: signed with the real key, an hour ago, for a minute.
    links = JoinLinks(rooms.runtime._link_key(), "https://x")
    expired, _, _ = links.issue(
        space.id, timedelta(minutes=1), datetime.now(UTC) - timedelta(hours=1)
    )
    error = await expect("JOIN_LINK_EXPIRED", rooms.join(space, stranger, expired))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("direction", ["host_blocks_user", "user_blocks_host"])
async def test_blocked_users_get_not_found(rooms: RoomsHarness, direction: str) -> None:
    host, user = await rooms.users(2)
    space = await rooms.create(host)
    if direction == "host_blocks_user":
        await rooms.block(host, user)
    else:
        await rooms.block(user, host)
    await expect("SPACE_NOT_FOUND", get(rooms, space, user))
    await expect("SPACE_NOT_FOUND", rooms.join(space, user))
    # Not even an invitation or a join link lets them in.
    link = (
        await rooms.stub.CreateJoinLink(
            pb.CreateJoinLinkRequest(name=space.name), metadata=rooms.as_user(host)
        )
    ).join_link
    await expect("SPACE_NOT_FOUND", rooms.join(space, user, link.token))
    listed = await rooms.stub.ListSpaces(pb.ListSpacesRequest(), metadata=rooms.as_user(user))
    assert space.name not in [s.name for s in listed.spaces]


async def test_removed_with_block_cannot_rejoin(rooms: RoomsHarness) -> None:
    host, kicked, banned = await rooms.users(3)
    space = await rooms.create(host)
    await rooms.join(space, kicked)
    await rooms.join(space, banned)
    await rooms.stub.RemoveParticipant(
        pb.RemoveParticipantRequest(name=f"{space.name}/participants/{kicked}"),
        metadata=rooms.as_user(host),
    )
    await rooms.stub.RemoveParticipant(
        pb.RemoveParticipantRequest(
            name=f"{space.name}/participants/{banned}", block_from_space=True
        ),
        metadata=rooms.as_user(host),
    )
    await rooms.join(space, kicked)  # removed without a block: may come back
    error = await expect("REMOVED_FROM_SPACE", rooms.join(space, banned))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_ticketed_space_admits_ticket_holders_host_and_invited(rooms: RoomsHarness) -> None:
    host, buyer, freeloader, guest = await rooms.users(4)
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    space = await rooms.create(host, ticketed=True, scheduled_start_time=start)
    rooms.payments.sell(space.id, buyer)
    await rooms.stub.InviteUsers(
        pb.InviteUsersRequest(name=space.name, users=[f"users/{guest}"]),
        metadata=rooms.as_user(host),
    )
    await rooms.stub.StartSpace(pb.StartSpaceRequest(name=space.name), metadata=rooms.as_user(host))
    await rooms.join(space, host)
    await rooms.join(space, buyer)
    await rooms.join(space, guest)
    error = await expect("TICKET_REQUIRED", rooms.join(space, freeloader))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (space.id, host) not in rooms.payments.checks
