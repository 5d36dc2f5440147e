"""Log-in throttling in Valkey: per handle, per client, shared by replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from spaces.identity.v1 import identity_resources_pb2 as resources_pb
from spaces.identity.v1 import identity_service_pb2 as pb

from tests.integration.identity.harness import PASSWORD, Identity, detail, reason

StartIdentity = Callable[..., AbstractAsyncContextManager[Identity]]


async def attempt(
    identity: Identity, handle: str, password: str, metadata: tuple[tuple[str, str], ...] = ()
) -> str:
    """Log in; return "OK" or the error reason."""
    try:
        await identity.stub.Login(
            pb.LoginRequest(handle=handle, password=password), metadata=metadata
        )
    except grpc.aio.AioRpcError as error:
        return reason(error)
    return "OK"


async def test_failures_for_one_handle_are_throttled(start_identity: StartIdentity) -> None:
    async with start_identity(login_max_failures_per_handle=3) as identity:
        await identity.signup("alice")
        await identity.signup("bob")
        results = [await attempt(identity, "alice", "wrong") for _ in range(3)]
        assert results == ["INVALID_CREDENTIALS"] * 3

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.Login(pb.LoginRequest(handle="ALICE", password=PASSWORD))
        # Even the right password waits: the handle is locked for the window.
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(caught.value) == "TOO_MANY_LOGIN_ATTEMPTS"
        retry = detail(caught.value, error_details_pb2.RetryInfo)
        assert retry is not None
        assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 15 * 60

        assert await attempt(identity, "bob", PASSWORD) == "OK"  # other handles are fine


async def test_unknown_handles_are_throttled_the_same_way(start_identity: StartIdentity) -> None:
    async with start_identity(login_max_failures_per_handle=2) as identity:
        results = [await attempt(identity, "ghost", "whatever") for _ in range(3)]
        assert results == ["INVALID_CREDENTIALS", "INVALID_CREDENTIALS", "TOO_MANY_LOGIN_ATTEMPTS"]


async def test_a_success_clears_the_handle_count(start_identity: StartIdentity) -> None:
    async with start_identity(login_max_failures_per_handle=3) as identity:
        await identity.signup("alice")
        for _ in range(2):
            assert await attempt(identity, "alice", "wrong") == "INVALID_CREDENTIALS"
        assert await attempt(identity, "alice", PASSWORD) == "OK"
        for _ in range(3):
            assert await attempt(identity, "alice", "wrong") == "INVALID_CREDENTIALS"
        assert await attempt(identity, "alice", PASSWORD) == "TOO_MANY_LOGIN_ATTEMPTS"


async def test_failures_from_one_client_are_throttled_across_handles(
    start_identity: StartIdentity,
) -> None:
    async with start_identity(
        login_max_failures_per_handle=100, login_max_failures_per_client=4
    ) as identity:
        await identity.signup("alice")
        results = [await attempt(identity, f"user{i}", "wrong") for i in range(4)]
        assert results == ["INVALID_CREDENTIALS"] * 4
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.Login(pb.LoginRequest(handle="alice", password=PASSWORD))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(caught.value) == "RATE_LIMITED"
        assert detail(caught.value, error_details_pb2.RetryInfo) is not None
        assert detail(caught.value, error_details_pb2.QuotaFailure) is not None

        # A forwarded client address counts only when a Spaces service (the gateway)
        # vouches for it; anyone else's header is ignored.
        forged = (("x-forwarded-for", "203.0.113.9"),)
        assert await attempt(identity, "alice", PASSWORD, forged) == "RATE_LIMITED"
        vouched = (*identity.service_metadata, ("x-forwarded-for", "203.0.113.9, 10.0.0.1"))
        assert await attempt(identity, "alice", PASSWORD, vouched) == "OK"


async def test_parallel_guesses_cannot_slip_past_the_limit(start_identity: StartIdentity) -> None:
    async with start_identity(login_max_failures_per_handle=5) as identity:
        await identity.signup("alice")
        results = await asyncio.gather(*(attempt(identity, "alice", "wrong") for _ in range(20)))
        assert results.count("INVALID_CREDENTIALS") == 5
        assert results.count("TOO_MANY_LOGIN_ATTEMPTS") == 15


async def test_replicas_share_the_counts(start_identity: StartIdentity) -> None:
    async with (
        start_identity(login_max_failures_per_handle=4) as one,
        start_identity(login_max_failures_per_handle=4) as two,
    ):
        await one.signup("alice")
        for replica in (one, two, one, two):
            assert await attempt(replica, "alice", "wrong") == "INVALID_CREDENTIALS"
        assert await attempt(two, "alice", PASSWORD) == "TOO_MANY_LOGIN_ATTEMPTS"
        assert await attempt(one, "alice", PASSWORD) == "TOO_MANY_LOGIN_ATTEMPTS"


async def test_sign_up_replays_count_as_password_guesses(start_identity: StartIdentity) -> None:
    async with start_identity(login_max_failures_per_handle=2) as identity:
        request = pb.CreateUserRequest(
            user=resources_pb.User(handle="alice", display_name="Alice"),
            password=PASSWORD,
            request_id=str(uuid.uuid4()),
        )
        await identity.stub.CreateUser(request)
        guess = pb.CreateUserRequest()
        guess.CopyFrom(request)
        guess.password = "a wrong guess"
        reasons = []
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await identity.stub.CreateUser(guess)
            reasons.append(reason(caught.value))
        assert reasons == ["IDEMPOTENCY_KEY_REUSED"] * 2 + ["TOO_MANY_LOGIN_ATTEMPTS"]
