"""Blocks: edges removed both ways, follows refused, blockers hidden, batched checks."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from spaces.identity.v1 import identity_events_pb2 as events_pb
from spaces.identity.v1 import identity_service_pb2 as pb

from tests.integration.identity.harness import Identity, counts, follow, ids_of, reason


async def block(identity: Identity, who: str, whom: str) -> pb.BlockUserResponse:
    response: pb.BlockUserResponse = await identity.stub.BlockUser(
        pb.BlockUserRequest(name=f"users/{whom}"), metadata=identity.token_for(who)
    )
    return response


async def unblock(identity: Identity, who: str, whom: str) -> pb.UnblockUserResponse:
    response: pb.UnblockUserResponse = await identity.stub.UnblockUser(
        pb.UnblockUserRequest(name=f"users/{whom}"), metadata=identity.token_for(who)
    )
    return response


async def refused(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code(), reason(caught.value)


async def test_blocking_removes_follows_both_ways(identity: Identity) -> None:
    alice, bob, carol = await identity.bulk_users(3)
    await follow(identity, alice, bob)
    await follow(identity, bob, alice)
    await follow(identity, carol, alice)

    response = await block(identity, alice, bob)
    relationship = response.relationship
    assert relationship.blocking and not relationship.blocked_by
    assert not relationship.following and not relationship.followed_by
    assert await counts(identity, alice) == (1, 0)  # carol still follows alice
    assert await counts(identity, bob) == (0, 0)
    assert (await block(identity, alice, bob)).relationship == relationship  # idempotent

    events = await identity.events(6)
    assert [e.type for e in events[3:]] == ["user.unfollowed", "user.unfollowed", "user.blocked"]
    blocked = events[5].unpack(events_pb.UserBlockedEvent)
    assert (blocked.blocker_id, blocked.blocked_id) == (alice, bob)
    removed = {
        (u.follower_id, u.followee_id)
        for u in (e.unpack(events_pb.UserUnfollowedEvent) for e in events[3:5])
    }
    assert removed == {(alice, bob), (bob, alice)}


async def test_blocks_refuse_follows_in_both_directions(identity: Identity) -> None:
    alice, bob = await identity.bulk_users(2)
    await block(identity, alice, bob)
    assert await refused(follow(identity, bob, alice)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "BLOCKED_BY_USER",
    )
    assert await refused(follow(identity, alice, bob)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "USER_BLOCKED",
    )
    assert await refused(block(identity, alice, alice)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "CANNOT_BLOCK_SELF",
    )
    assert await refused(unblock(identity, alice, "nobody")) == (
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )

    after = await unblock(identity, alice, bob)
    assert not after.relationship.blocking
    await unblock(identity, alice, bob)  # idempotent
    await follow(identity, bob, alice)  # allowed again; old follows were not restored
    assert await counts(identity, alice) == (1, 0)
    events = await identity.events(3)
    assert [e.type for e in events] == ["user.blocked", "user.unblocked", "user.followed"]


async def test_the_blocker_is_hidden_from_the_blocked(identity: Identity) -> None:
    alice, bob, carol, dave = await identity.bulk_users(4)
    for fan in (alice, bob, dave):
        await follow(identity, fan, carol)
    await follow(identity, carol, alice)
    await block(identity, alice, bob)

    # bob cannot list alice's graph ...
    for call in (
        identity.stub.ListFollowers(
            pb.ListFollowersRequest(parent=f"users/{alice}"), metadata=identity.token_for(bob)
        ),
        identity.stub.ListFollowing(
            pb.ListFollowingRequest(parent=f"users/{alice}"), metadata=identity.token_for(bob)
        ),
    ):
        assert await refused(call) == (grpc.StatusCode.PERMISSION_DENIED, "BLOCKED_BY_USER")
    # ... and does not find alice in other people's lists, while everyone else does.
    as_bob = await identity.stub.ListFollowers(
        pb.ListFollowersRequest(parent=f"users/{carol}"), metadata=identity.token_for(bob)
    )
    assert ids_of(as_bob.followers) == [dave, bob]
    as_dave = await identity.stub.ListFollowers(
        pb.ListFollowersRequest(parent=f"users/{carol}"), metadata=identity.token_for(dave)
    )
    assert ids_of(as_dave.followers) == [dave, bob, alice]
    bob_sees = await identity.stub.ListFollowing(
        pb.ListFollowingRequest(parent=f"users/{carol}"), metadata=identity.token_for(bob)
    )
    assert ids_of(bob_sees.following) == []
    # Services see everything.
    as_service = await identity.stub.ListFollowers(
        pb.ListFollowersRequest(parent=f"users/{carol}"), metadata=identity.service_metadata
    )
    assert len(as_service.followers) == 3


async def test_list_blocked_users_is_private(identity: Identity) -> None:
    alice, bob, carol = await identity.bulk_users(3)
    await block(identity, alice, bob)
    await block(identity, alice, carol)
    mine = await identity.stub.ListBlockedUsers(
        pb.ListBlockedUsersRequest(parent="users/me", page_size=1),
        metadata=identity.token_for(alice),
    )
    assert ids_of(mine.blocked_users) == [carol] and mine.next_page_token
    rest = await identity.stub.ListBlockedUsers(
        pb.ListBlockedUsersRequest(parent=f"users/{alice}", page_token=mine.next_page_token),
        metadata=identity.token_for(alice),
    )
    assert ids_of(rest.blocked_users) == [bob] and not rest.next_page_token
    for metadata in (identity.token_for(bob), identity.service_metadata):
        call = identity.stub.ListBlockedUsers(
            pb.ListBlockedUsersRequest(parent=f"users/{alice}"), metadata=metadata
        )
        assert await refused(call) == (grpc.StatusCode.PERMISSION_DENIED, "NOT_SELF")


async def test_batch_check_blocks(identity: Identity) -> None:
    x, a, b, c = await identity.bulk_users(4)
    await block(identity, x, a)
    await block(identity, b, x)
    await block(identity, x, c)
    await block(identity, c, x)
    response = await identity.stub.BatchCheckBlocks(
        pb.BatchCheckBlocksRequest(user_id=x, other_user_ids=[c, "unknown-user", b, a]),
        metadata=identity.service_metadata,
    )
    assert [(k.other_user_id, k.blocking, k.blocked_by) for k in response.checks] == [
        (c, True, True),
        ("unknown-user", False, False),
        (b, False, True),
        (a, True, False),
    ]
    assert response.any_block
    clean = await identity.stub.BatchCheckBlocks(
        pb.BatchCheckBlocksRequest(user_id=a, other_user_ids=[b, c]),
        metadata=identity.service_metadata,
    )
    assert not clean.any_block
    assert await refused(
        identity.stub.BatchCheckBlocks(
            pb.BatchCheckBlocksRequest(user_id=x, other_user_ids=[a]),
            metadata=identity.token_for(x),
        )
    ) == (grpc.StatusCode.PERMISSION_DENIED, "INTERNAL_ONLY")
    assert await refused(
        identity.stub.BatchCheckBlocks(
            pb.BatchCheckBlocksRequest(user_id=x, other_user_ids=[a, a]),
            metadata=identity.service_metadata,
        )
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_get_relationship(identity: Identity) -> None:
    alice, bob = await identity.bulk_users(2)
    await follow(identity, bob, alice)
    await block(identity, alice, bob)
    mine = await identity.stub.GetRelationship(
        pb.GetRelationshipRequest(name=f"users/me/relationships/{bob}"),
        metadata=identity.token_for(alice),
    )
    assert mine.relationship.name == f"users/{alice}/relationships/{bob}"
    assert mine.relationship.blocking and not mine.relationship.followed_by
    seen_by_service = await identity.stub.GetRelationship(
        pb.GetRelationshipRequest(name=f"users/{bob}/relationships/{alice}"),
        metadata=identity.service_metadata,
    )
    assert seen_by_service.relationship.blocked_by
    self_pair = await identity.stub.GetRelationship(
        pb.GetRelationshipRequest(name=f"users/{alice}/relationships/{alice}"),
        metadata=identity.token_for(alice),
    )
    rel = self_pair.relationship
    assert not (rel.following or rel.followed_by or rel.blocking or rel.blocked_by)

    assert await refused(
        identity.stub.GetRelationship(
            pb.GetRelationshipRequest(name=f"users/{bob}/relationships/{alice}"),
            metadata=identity.token_for(alice),
        )
    ) == (grpc.StatusCode.PERMISSION_DENIED, "NOT_SELF")
    assert await refused(
        identity.stub.GetRelationship(
            pb.GetRelationshipRequest(name="users/me/relationships/nobody"),
            metadata=identity.token_for(alice),
        )
    ) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
