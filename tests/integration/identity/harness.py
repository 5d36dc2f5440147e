"""The identity service in-process (port 0) on a real pool and Redis, and ways to poke it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import grpc.aio
import redis.asyncio
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import SecretStr
from spaces.identity.v1 import identity_resources_pb2 as resources_pb
from spaces.identity.v1 import identity_service_pb2 as pb
from spaces.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.common.auth import ServiceTokenIssuer
from services.common.events import StreamEvent, stream_name
from services.common.ids import new_id
from services.common.server import Service
from services.common.settings import CommonSettings
from services.identity import domain
from services.identity.main import IdentityRuntime, build_service
from services.identity.settings import IdentitySettings
from services.identity.signing import utc_now
from services.identity.tokens import issue_access_token
from tests.helpers.tokens import TEST_INTERNAL_SECRET

PASSWORD = "correct horse battery"
M = TypeVar("M", bound=Message)
Metadata = tuple[tuple[str, str], ...]


def identity_settings(**overrides: Any) -> IdentitySettings:
    """Settings for tests: free port, no metrics, cheap password hashing, no surprises."""
    base: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": None,
        "shutdown_grace_s": 0.5,
        # Cheap Argon2id: tests create hundreds of accounts; production uses the defaults.
        "password_time_cost": 1,
        "password_memory_kib": 1024,
        "key_check_interval_s": 3600.0,
        "db_pool_max_size": 10,
    }
    return IdentitySettings(**{**base, **overrides})


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call."""
    info = detail(error, error_details_pb2.ErrorInfo)
    assert info is not None, f"no ErrorInfo in {error}"
    return str(info.reason)


def detail(error: grpc.aio.AioRpcError, kind: type[M]) -> M | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            return message
    return None


@dataclasses.dataclass
class Identity:
    """A running identity service and a client for it."""

    service: Service
    runtime: IdentityRuntime
    channel: grpc.aio.Channel
    stub: pb_grpc.IdentityServiceAsyncStub
    redis_url: str

    @property
    def service_metadata(self) -> Metadata:
        """Credentials of another Spaces service (rooms)."""
        return bearer(ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET).token())

    async def signup(
        self,
        handle: str,
        password: str = PASSWORD,
        display_name: str = "",
        bio: str = "",
        avatar_uri: str = "",
    ) -> tuple[resources_pb.User, resources_pb.AuthTokens]:
        response = await self.stub.CreateUser(
            pb.CreateUserRequest(
                user=resources_pb.User(
                    handle=handle,
                    display_name=display_name or handle.title(),
                    bio=bio,
                    avatar_uri=avatar_uri,
                ),
                password=password,
                request_id=str(uuid.uuid4()),
            )
        )
        return response.user, response.tokens

    async def user_token(self, handle: str) -> tuple[str, Metadata]:
        """Sign up ``handle``; return its id and the metadata of its access token."""
        user, tokens = await self.signup(handle)
        return user.id, bearer(tokens.access_token)

    async def bulk_users(self, count: int, prefix: str = "u") -> list[str]:
        """Insert ``count`` users straight into the table (no password hashing): fixtures."""
        now = utc_now()
        ids = [new_id() for _ in range(count)]
        assert self.runtime.pool is not None
        async with self.runtime.pool.connection() as conn:
            async with conn.cursor() as cur:
                await cur.executemany(
                    """INSERT INTO users (id, handle, handle_key, display_name, password_hash,
                                          create_time, update_time)
                       VALUES (%s, %s, %s, %s, 'not-a-hash', %s, %s)""",
                    [
                        (uid, f"{prefix}{i}", f"{prefix}{i}".lower(), f"User {i}", now, now)
                        for i, uid in enumerate(ids)
                    ],
                )
        return ids

    def token_for(self, user_id: str) -> Metadata:
        """An access token for ``user_id`` signed with identity's current key."""
        issued = issue_access_token(
            self.runtime.keys.signer(),
            user_id,
            domain.new_family_id(),
            utc_now(),
            self.runtime.settings.access_token_ttl,
        )
        return bearer(issued.token)

    async def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        assert self.runtime.pool is not None
        async with self.runtime.pool.connection() as conn:
            cur = await conn.execute(query, params)
            return list(await cur.fetchall()) if cur.description else []

    async def events(self, count: int, timeout: float = 10.0) -> list[StreamEvent]:
        """Wait until identity's stream holds ``count`` events; return them all."""
        client = redis.asyncio.Redis.from_url(self.redis_url)
        try:
            deadline = time.monotonic() + timeout
            while await client.xlen(stream_name("identity")) < count:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"only {await client.xlen(stream_name('identity'))} of {count} events"
                    )
                await asyncio.sleep(0.02)
            entries: Any = await client.xrange(stream_name("identity"))
            return [StreamEvent.from_entry(i, f) for i, f in entries]
        finally:
            await client.aclose()


@asynccontextmanager
async def running_identity(
    database_url: str, redis_url: str, **overrides: Any
) -> AsyncIterator[Identity]:
    """Start identity on a free port against the test's database and Redis."""
    common = CommonSettings(
        database_url=database_url,
        redis_url=redis_url,
        internal_secret=SecretStr(TEST_INTERNAL_SECRET),
    )
    service, runtime = build_service(identity_settings(**overrides), common)
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield Identity(service, runtime, channel, pb_grpc.IdentityServiceStub(channel), redis_url)
    finally:
        await channel.close(None)
        await service.stop(grace=0)


def ids_of(summaries: Sequence[resources_pb.UserSummary]) -> list[str]:
    return [s.name.removeprefix("users/") for s in summaries]


async def follow(identity: Identity, who: str, whom: str) -> pb.FollowUserResponse:
    response: pb.FollowUserResponse = await identity.stub.FollowUser(
        pb.FollowUserRequest(name=f"users/{whom}"), metadata=identity.token_for(who)
    )
    return response


async def unfollow(identity: Identity, who: str, whom: str) -> pb.UnfollowUserResponse:
    response: pb.UnfollowUserResponse = await identity.stub.UnfollowUser(
        pb.UnfollowUserRequest(name=f"users/{whom}"), metadata=identity.token_for(who)
    )
    return response


async def counts(identity: Identity, user_id: str) -> tuple[int, int]:
    response = await identity.stub.GetUser(
        pb.GetUserRequest(name=f"users/{user_id}"), metadata=identity.service_metadata
    )
    return response.user.follower_count, response.user.following_count
