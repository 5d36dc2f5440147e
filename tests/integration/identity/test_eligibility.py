"""Host eligibility under the default policy (0) and the early rule (600 followers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import grpc
import grpc.aio
import pytest
from spaces.identity.v1 import identity_resources_pb2 as resources_pb
from spaces.identity.v1 import identity_service_pb2 as pb

from tests.integration.identity.harness import Identity, follow, reason, unfollow

StartIdentity = Callable[..., AbstractAsyncContextManager[Identity]]


async def check(identity: Identity, user_id: str) -> pb.CheckHostEligibilityResponse:
    response: pb.CheckHostEligibilityResponse = await identity.stub.CheckHostEligibility(
        pb.CheckHostEligibilityRequest(user=f"users/{user_id}"),
        metadata=identity.service_metadata,
    )
    return response


async def test_by_default_everyone_may_host(identity: Identity) -> None:
    [newcomer] = await identity.bulk_users(1)
    verdict = await check(identity, newcomer)
    assert verdict.eligible
    assert verdict.reason == resources_pb.HOST_ELIGIBILITY_REASON_ELIGIBLE
    assert (verdict.min_followers, verdict.follower_count) == (0, 0)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(identity, "nobody")
    assert reason(caught.value) == "USER_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.CheckHostEligibility(
            pb.CheckHostEligibilityRequest(user=f"users/{newcomer}"),
            metadata=identity.token_for(newcomer),
        )
    assert reason(caught.value) == "INTERNAL_ONLY"


async def test_the_600_follower_rule(start_identity: StartIdentity) -> None:
    async with start_identity(host_min_followers=600) as identity:
        host, *fans = await identity.bulk_users(601)
        semaphore = asyncio.Semaphore(32)

        async def fan_follows(fan: str) -> None:
            async with semaphore:
                await follow(identity, fan, host)

        await asyncio.gather(*(fan_follows(fan) for fan in fans[:599]))
        verdict = await check(identity, host)
        assert not verdict.eligible
        assert verdict.reason == resources_pb.HOST_ELIGIBILITY_REASON_NOT_ENOUGH_FOLLOWERS
        assert (verdict.min_followers, verdict.follower_count) == (600, 599)

        await follow(identity, fans[599], host)
        verdict = await check(identity, host)
        assert verdict.eligible
        assert verdict.reason == resources_pb.HOST_ELIGIBILITY_REASON_ELIGIBLE
        assert (verdict.min_followers, verdict.follower_count) == (600, 600)

        await unfollow(identity, fans[0], host)
        assert not (await check(identity, host)).eligible
