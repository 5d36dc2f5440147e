"""The follow graph: idempotent edges, exact counts under concurrency, lists, streams."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import grpc
import grpc.aio
import pytest
from spaces.identity.v1 import identity_events_pb2 as events_pb
from spaces.identity.v1 import identity_service_pb2 as pb

from tests.integration.identity.harness import Identity, counts, follow, ids_of, reason, unfollow

StartIdentity = Callable[..., AbstractAsyncContextManager[Identity]]


async def test_follow_and_unfollow_are_idempotent(identity: Identity) -> None:
    alice, bob = await identity.bulk_users(2)
    first = await follow(identity, alice, bob)
    again = await follow(identity, alice, bob)
    assert first.relationship == again.relationship
    assert first.relationship.name == f"users/{alice}/relationships/{bob}"
    assert first.relationship.other_user == f"users/{bob}"
    assert first.relationship.following and not first.relationship.followed_by
    assert await counts(identity, bob) == (1, 0) and await counts(identity, alice) == (0, 1)

    back = await follow(identity, bob, alice)
    assert back.relationship.following and back.relationship.followed_by

    gone = await unfollow(identity, alice, bob)
    await unfollow(identity, alice, bob)
    assert not gone.relationship.following and gone.relationship.followed_by
    assert await counts(identity, bob) == (0, 1) and await counts(identity, alice) == (1, 0)

    events = await identity.events(3)
    assert [e.type for e in events] == ["user.followed", "user.followed", "user.unfollowed"]
    unfollowed = events[2].unpack(events_pb.UserUnfollowedEvent)
    assert (unfollowed.follower_id, unfollowed.followee_id) == (alice, bob)
    assert events[0].key == f"users/{alice}/relationships/{bob}"


async def test_follow_refusals(start_identity: StartIdentity) -> None:
    async with start_identity(max_following=2) as identity:
        alice, bob, carol, dave = await identity.bulk_users(4)
        cases = [
            (
                follow(identity, alice, alice),
                grpc.StatusCode.INVALID_ARGUMENT,
                "CANNOT_FOLLOW_SELF",
            ),
            (
                unfollow(identity, alice, alice),
                grpc.StatusCode.INVALID_ARGUMENT,
                "CANNOT_FOLLOW_SELF",
            ),
            (follow(identity, alice, "nobody"), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"),
            (unfollow(identity, alice, "nobody"), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"),
        ]
        for call, code, expected in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert (caught.value.code(), reason(caught.value)) == (code, expected)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.FollowUser(
                pb.FollowUserRequest(name=f"users/{bob}"), metadata=identity.service_metadata
            )
        assert reason(caught.value) == "ME_WITHOUT_USER"

        await follow(identity, alice, bob)
        await follow(identity, alice, carol)
        await follow(identity, alice, carol)  # already followed: no new edge, no refusal
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await follow(identity, alice, dave)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(caught.value) == "FOLLOW_LIMIT_REACHED"


async def test_counts_stay_exact_under_200_concurrent_calls(identity: Identity) -> None:
    users = await identity.bulk_users(40)
    star, others = users[0], users[1:]
    rng = random.Random(7)
    # Some edges exist beforehand, so unfollows have something to remove.
    initial = {(a, b) for a in users for b in users if a != b and rng.random() < 0.05}
    initial |= {(o, star) for o in others[:20]}
    for a, b in sorted(initial):
        await follow(identity, a, b)

    # 200 calls: every follower of the star flips (follow or unfollow), each other pair is
    # touched once (so the outcome is known), plus duplicates of the same call (idempotent)
    # and a contested pair followed and unfollowed at once (either outcome is valid).
    calls: list[tuple[str, str, str]] = [
        ("unfollow" if (o, star) in initial else "follow", o, star) for o in others
    ]
    contested = (others[4], others[5])
    special = {(others[0], others[1]), (others[2], others[3]), contested}
    pairs = [(a, b) for a in others for b in others if a != b and (a, b) not in special]
    rng.shuffle(pairs)
    for a, b in pairs[:140]:
        calls.append(("unfollow" if (a, b) in initial else "follow", a, b))
    calls += [("follow", others[0], others[1])] * 10 + [("unfollow", others[2], others[3])] * 5
    calls += [("follow", *contested), ("unfollow", *contested)] * 3
    calls = calls[:200]
    assert len(calls) == 200
    rng.shuffle(calls)

    expected = set(initial)
    for op, a, b in calls:
        if (a, b) != contested:
            (expected.add if op == "follow" else expected.discard)((a, b))

    async def run(op: str, a: str, b: str) -> None:
        await (follow if op == "follow" else unfollow)(identity, a, b)

    await asyncio.gather(*(run(*call) for call in calls))

    edges = {(a, b) for a, b in await identity.sql("SELECT follower_id, followee_id FROM follows")}
    assert edges - {contested} == expected - {contested}
    for user in users:
        followers = sum(1 for _, b in edges if b == user)
        following = sum(1 for a, _ in edges if a == user)
        assert await counts(identity, user) == (followers, following), user
    # Events match the edges: per pair, follows minus unfollows is 1 exactly when it exists.
    while (await identity.sql("SELECT count(*) FROM outbox"))[0][0]:
        await asyncio.sleep(0.05)
    balance: dict[tuple[str, str], int] = {}
    for event in await identity.events(0):
        if event.type == "user.followed":
            e = event.unpack(events_pb.UserFollowedEvent)
            balance[e.follower_id, e.followee_id] = (
                balance.get((e.follower_id, e.followee_id), 0) + 1
            )
        else:
            u = event.unpack(events_pb.UserUnfollowedEvent)
            balance[u.follower_id, u.followee_id] = (
                balance.get((u.follower_id, u.followee_id), 0) - 1
            )
    assert {pair for pair, n in balance.items() if n == 1} == edges
    assert set(balance.values()) <= {0, 1}


async def test_lists_are_newest_first_and_page_stably(identity: Identity) -> None:
    star, *fans = await identity.bulk_users(8)
    for fan in fans:
        await follow(identity, fan, star)
    await unfollow(identity, fans[2], star)
    await follow(identity, fans[2], star)  # a re-follow is the newest
    expected = [*reversed([f for f in fans if f != fans[2]])]
    expected.insert(0, fans[2])

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await identity.stub.ListFollowers(
            pb.ListFollowersRequest(parent=f"users/{star}", page_size=3, page_token=token),
            metadata=identity.token_for(fans[0]),
        )
        pages += 1
        seen += ids_of(page.followers)
        if pages == 1:
            await follow(identity, star, fans[0])  # unrelated writes do not disturb paging
        token = page.next_page_token
        if not token:
            break
    assert seen == expected and pages == 3

    following = await identity.stub.ListFollowing(
        pb.ListFollowingRequest(parent="users/me"), metadata=identity.token_for(fans[3])
    )
    assert ids_of(following.following) == [star]
    assert following.following[0].handle == "u0"


async def test_page_tokens_belong_to_their_query(identity: Identity) -> None:
    alice, bob, carol = await identity.bulk_users(3)
    await follow(identity, bob, alice)
    await follow(identity, carol, alice)
    page = await identity.stub.ListFollowers(
        pb.ListFollowersRequest(parent=f"users/{alice}", page_size=1),
        metadata=identity.token_for(bob),
    )
    token = page.next_page_token
    assert token
    bad = [
        pb.ListFollowersRequest(parent=f"users/{alice}", page_token="not a token!"),
        pb.ListFollowersRequest(parent=f"users/{alice}", page_token="Zm9v"),
        pb.ListFollowersRequest(parent=f"users/{bob}", page_token=token),
    ]
    for request in bad:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.ListFollowers(request, metadata=identity.token_for(bob))
        assert reason(caught.value) == "PAGE_TOKEN_INVALID"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.ListFollowing(
            pb.ListFollowingRequest(parent=f"users/{alice}", page_token=token),
            metadata=identity.token_for(bob),
        )
    assert reason(caught.value) == "PAGE_TOKEN_INVALID"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.ListFollowers(
            pb.ListFollowersRequest(parent="users/nobody"), metadata=identity.token_for(bob)
        )
    assert reason(caught.value) == "USER_NOT_FOUND"


async def stream_all(
    identity: Identity, parent: str, batch_size: int = 0, cursor: str = ""
) -> list[pb.StreamFollowerIdsResponse]:
    call = identity.stub.StreamFollowerIds(
        pb.StreamFollowerIdsRequest(parent=parent, batch_size=batch_size, cursor=cursor),
        metadata=identity.service_metadata,
    )
    return [batch async for batch in call]


async def test_stream_follower_ids_in_batches_and_resumes(identity: Identity) -> None:
    star, *fans = await identity.bulk_users(26)
    for fan in fans:
        await follow(identity, fan, star)
    batches = await stream_all(identity, f"users/{star}", batch_size=10)
    assert [len(b.follower_ids) for b in batches] == [10, 10, 5]
    assert [i for b in batches for i in b.follower_ids] == fans  # oldest follow first

    resumed = await stream_all(identity, f"users/{star}", batch_size=10, cursor=batches[0].cursor)
    assert [i for b in resumed for i in b.follower_ids] == fans[10:]
    assert await stream_all(identity, f"users/{star}", cursor=batches[-1].cursor) == []
    default = await stream_all(identity, f"users/{star}")
    assert [len(b.follower_ids) for b in default] == [25]

    following = identity.stub.StreamFollowingIds(
        pb.StreamFollowingIdsRequest(parent=f"users/{fans[0]}"),
        metadata=identity.service_metadata,
    )
    assert [list(b.following_ids) async for b in following] == [[star]]


async def test_stream_refusals(identity: Identity) -> None:
    star, fan = await identity.bulk_users(2)
    await follow(identity, fan, star)
    [batch] = await stream_all(identity, f"users/{star}")
    cases = [
        (f"users/{fan}", batch.cursor, identity.service_metadata, "CURSOR_INVALID"),
        (f"users/{star}", "garbage", identity.service_metadata, "CURSOR_INVALID"),
        ("users/nobody", "", identity.service_metadata, "USER_NOT_FOUND"),
        ("users/me", "", identity.service_metadata, "ME_WITHOUT_USER"),
        (f"users/{star}", "", identity.token_for(fan), "INTERNAL_ONLY"),
    ]
    for parent, cursor, metadata, expected in cases:
        call = identity.stub.StreamFollowerIds(
            pb.StreamFollowerIdsRequest(parent=parent, cursor=cursor), metadata=metadata
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [b async for b in call]
        assert reason(caught.value) == expected, parent
