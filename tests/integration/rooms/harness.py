"""Rooms in-process (port 0) with the real identity service, PostgreSQL and Valkey, and
the media and payments test doubles; plus helpers to build Spaces with people in each role."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import SecretStr
from spaces.identity.v1 import identity_service_pb2 as id_pb
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as pb_grpc

from services.common.auth import ServiceTokenIssuer
from services.common.grants import MediaGrantSettings
from services.common.server import Service
from services.common.settings import CommonSettings
from services.rooms.live import LiveSettings
from services.rooms.main import RoomsRuntime, build_service
from services.rooms.settings import RoomsSettings
from tests.helpers.rooms_doubles import (
    RecordingMediaControl,
    TicketBook,
    running_media,
    running_payments,
)
from tests.helpers.tokens import TEST_INTERNAL_SECRET
from tests.integration.identity.harness import Identity, running_identity

Metadata = tuple[tuple[str, str], ...]
GRANT_SECRET = "test-media-grant-secret-0123456789abcdef"


def rooms_settings(**overrides: Any) -> RoomsSettings:
    """Settings for tests: free port, no metrics, a slow sweeper unless asked."""
    base: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": None,
        "shutdown_grace_s": 0.5,
        "sweep_interval_s": 3600.0,
        "db_pool_max_size": 30,
    }
    return RoomsSettings(**{**base, **overrides})


def live_settings() -> LiveSettings:
    return LiveSettings(
        check_interval_s=0.2,
        gap_grace_s=0.02,
        flush_interval_s=0.002,
        reaction_window_s=0.1,
        speaking_levels_interval_s=0.1,
        resume_token_secret=SecretStr("test-secret-test-secret-test-secret"),
    )


def reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no status details in {error}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {error}")


def request_id() -> str:
    return str(uuid.uuid4())


@dataclasses.dataclass
class RoomsHarness:
    """A running rooms service, its dependencies and a client."""

    identity: Identity
    media: RecordingMediaControl
    payments: TicketBook
    service: Service
    runtime: RoomsRuntime
    stub: pb_grpc.RoomsServiceAsyncStub
    common: CommonSettings

    def as_user(self, user_id: str) -> Metadata:
        return self.identity.token_for(user_id)

    @property
    def as_service(self) -> Metadata:
        return (
            (
                "authorization",
                f"Bearer {ServiceTokenIssuer('media', TEST_INTERNAL_SECRET).token()}",
            ),
        )

    async def users(self, count: int, prefix: str = "u") -> list[str]:
        return await self.identity.bulk_users(count, prefix=f"{prefix}{uuid.uuid4().hex[:6]}")

    async def follow(self, who: str, whom: str) -> None:
        await self.identity.stub.FollowUser(
            id_pb.FollowUserRequest(name=f"users/{whom}"), metadata=self.as_user(who)
        )

    async def block(self, who: str, whom: str) -> None:
        await self.identity.stub.BlockUser(
            id_pb.BlockUserRequest(name=f"users/{whom}"), metadata=self.as_user(who)
        )

    async def create(self, host: str, **fields: Any) -> res.Space:
        title = fields.pop("title", "Talk")
        response = await self.stub.CreateSpace(
            pb.CreateSpaceRequest(space=res.Space(title=title, **fields), request_id=request_id()),
            metadata=self.as_user(host),
        )
        return response.space

    async def join(self, space: res.Space, user: str, link: str = "") -> pb.JoinSpaceResponse:
        response: pb.JoinSpaceResponse = await self.stub.JoinSpace(
            pb.JoinSpaceRequest(name=space.name, request_id=request_id(), join_link_token=link),
            metadata=self.as_user(user),
        )
        return response

    async def participant(
        self, space: res.Space, user: str, as_user: str | None = None
    ) -> res.Participant:
        response = await self.stub.GetParticipant(
            pb.GetParticipantRequest(name=f"{space.name}/participants/{user}"),
            metadata=self.as_user(as_user or user),
        )
        return response.participant

    async def make_speaker(self, space: res.Space, host: str, user: str) -> None:
        await self.stub.RequestToSpeak(
            pb.RequestToSpeakRequest(name=space.name), metadata=self.as_user(user)
        )
        await self.stub.ApproveSpeaker(
            pb.ApproveSpeakerRequest(name=f"{space.name}/participants/{user}"),
            metadata=self.as_user(host),
        )

    async def make_co_host(self, space: res.Space, host: str, user: str) -> None:
        await self.stub.AddCoHost(
            pb.AddCoHostRequest(name=f"{space.name}/participants/{user}"),
            metadata=self.as_user(host),
        )
        await self.stub.AcceptCoHostInvitation(
            pb.AcceptCoHostInvitationRequest(name=space.name), metadata=self.as_user(user)
        )

    async def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        assert self.runtime.pool is not None
        async with self.runtime.pool.connection() as conn:
            cur = await conn.execute(query, params)  # type: ignore[arg-type]
            return list(await cur.fetchall()) if cur.description else []


@asynccontextmanager
async def started_rooms(
    common: CommonSettings, **overrides: Any
) -> AsyncIterator[tuple[Service, RoomsRuntime, grpc.aio.Channel]]:
    """Start one rooms replica."""
    service, runtime = build_service(
        rooms_settings(**overrides),
        common,
        grants=MediaGrantSettings(secret=SecretStr(GRANT_SECRET), ttl_s=120),
        live=live_settings(),
    )
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield service, runtime, channel
    finally:
        await channel.close(None)
        await service.stop(grace=0)


@asynccontextmanager
async def running_rooms(
    database_url: str, redis_url: str, **overrides: Any
) -> AsyncIterator[RoomsHarness]:
    """Identity, the doubles and rooms, all on the test's database and Redis."""
    media = RecordingMediaControl()
    book = TicketBook()
    async with (
        running_identity(database_url, redis_url) as identity,
        running_media(media) as media_service,
        running_payments(book) as payments_service,
    ):
        common = CommonSettings(
            database_url=database_url,
            redis_url=redis_url,
            internal_secret=SecretStr(TEST_INTERNAL_SECRET),
            identity_addr=f"127.0.0.1:{identity.service.port}",
            media_addr=f"127.0.0.1:{media_service.port}",
            payments_addr=f"127.0.0.1:{payments_service.port}",
        )
        async with started_rooms(common, **overrides) as (service, runtime, channel):
            yield RoomsHarness(
                identity=identity,
                media=media,
                payments=book,
                service=service,
                runtime=runtime,
                stub=pb_grpc.RoomsServiceStub(channel),
                common=common,
            )


SHORT = timedelta(milliseconds=300)
