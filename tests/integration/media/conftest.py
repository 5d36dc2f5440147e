"""Fixtures: a media engine on 127.0.0.1 and app peers that gather on loopback only; media
processes (gRPC servicer, node, engine) and what a test needs to talk to them as rooms and
as an app: service tokens, media grants, placement and negotiation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from spaces.media.v1 import media_service_pb2 as pb
from spaces.media.v1 import media_service_pb2_grpc as pb_grpc

from services.common.auth import ServiceTokenIssuer, StaticJwksSource
from services.common.grants import MediaGrantSettings, MediaGrantSigner
from services.common.server import Service
from services.common.settings import CommonSettings
from services.media.config import MediaConfig
from services.media.engine import MediaEngine
from services.media.main import MediaRuntime, build_service
from services.media.settings import MediaSettings
from tests.helpers.ice import loopback_ice  # noqa: F401  (autouse)
from tests.helpers.servers import bearer, plain_channel
from tests.helpers.tokens import TEST_INTERNAL_SECRET, SigningKey, jwks
from tests.integration.media.peers import App, Tone

GRANT_SECRET = "media-grant-secret-for-tests-0123456789abcdef"


@pytest.fixture
async def engine() -> AsyncIterator[MediaEngine]:
    """A started engine (egress on one worker thread, quick RTCP)."""
    async with MediaEngine(MediaConfig(rtcp_interval=0.5)) as running:
        yield running


AppFactory = Callable[..., App]


@pytest.fixture
async def apps() -> AsyncIterator[AppFactory]:
    """Make apps (``apps("alice", tone=Tone(440, 0.3))``), all closed after the test."""
    async with AsyncExitStack() as stack:

        def make(name: str, tone: Tone | None = None, slots: int = 3) -> App:
            app = App(name, tone, slots)
            stack.push_async_callback(app.close)
            return app

        yield make


@dataclass
class MediaProcess:
    """A media process in the test process: its gRPC server and the runtime holding its node."""

    service: Service
    runtime: MediaRuntime


def build_media(
    redis_url: str,
    signing_key: SigningKey,
    node_id: str = "media-t",
    capacity: int = 2000,
    *,
    rooms_addr: str = "127.0.0.1:1",
    recordings_dir: Path | None = None,
) -> MediaProcess:
    """A media process, not started, on ``redis_url`` (the test's Valkey), trusting
    ``signing_key`` for users and ``GRANT_SECRET`` for grants; rooms at ``rooms_addr``
    (unreachable unless given)."""
    settings = MediaSettings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=None,
        node_id=node_id,
        ice_port=0,
        capacity=capacity,
        heartbeat_s=0.3,
        shutdown_grace_s=0.5,
        drain_grace_s=0.5,
    )
    if recordings_dir is not None:
        settings = settings.model_copy(update={"recordings_dir": recordings_dir})
    service, runtime = build_service(
        settings,
        CommonSettings(
            redis_url=redis_url,
            internal_secret=SecretStr(TEST_INTERNAL_SECRET),
            rooms_addr=rooms_addr,
            payments_addr="127.0.0.1:1",
        ),
        MediaGrantSettings(secret=SecretStr(GRANT_SECRET)),
        jwks=StaticJwksSource(jwks(signing_key)),
    )
    return MediaProcess(service, runtime)


MediaFactory = Callable[..., Awaitable[MediaProcess]]


@pytest.fixture
async def start_media(redis_url: str, signing_key: SigningKey) -> AsyncIterator[MediaFactory]:
    """Start media processes as :func:`build_media` makes them
    (``await start_media("media-a", capacity=1)``); the last started is stopped first, all
    after the test."""
    async with AsyncExitStack() as stack:

        async def start(node_id: str, **options: Any) -> MediaProcess:
            process = build_media(redis_url, signing_key, node_id, **options)
            await process.service.start()
            stack.push_async_callback(process.service.stop, grace=0)
            return process

        yield start


@asynccontextmanager
async def media_stub(port: int) -> AsyncIterator[pb_grpc.MediaServiceAsyncStub]:
    """A MediaService client on a plain channel to ``port`` (metadata set by hand)."""
    async with plain_channel(port) as channel:
        yield pb_grpc.MediaServiceStub(channel)


def service_token() -> tuple[tuple[str, str], ...]:
    """Call metadata of rooms, the service that opens Spaces and places participants."""
    return bearer(ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET).token())


async def open_space(stub: pb_grpc.MediaServiceAsyncStub, space: str) -> pb.OpenSpaceResponse:
    """Open ``spaces/{space}`` as rooms does."""
    return await stub.OpenSpace(
        pb.OpenSpaceRequest(space=f"spaces/{space}"), metadata=service_token()
    )


def media_grant(
    space: str,
    user: str,
    node: str,
    *,
    publish: bool = False,
    role: str | None = None,
    now: datetime | None = None,
    secret: str = GRANT_SECRET,
) -> str:
    """A grant as rooms signs it: ``user`` may open a session in ``space`` on ``node`` (an
    id, without ``mediaNodes/``); the role is speaker or listener as ``publish`` says,
    unless given."""
    token, _ = MediaGrantSigner(secret).sign(
        space_id=space,
        user_id=user,
        role=role or ("speaker" if publish else "listener"),
        may_publish=publish,
        node=node,
        now=now,
    )
    return token


async def place(
    stub: pb_grpc.MediaServiceAsyncStub,
    space: str,
    user: str,
    *,
    publish: bool,
    role: str | None = None,
) -> tuple[str, str]:
    """Place the user as rooms does and sign their grant for the node chosen: the node's
    name (``mediaNodes/…``) and the grant."""
    placed = await stub.PlaceParticipant(
        pb.PlaceParticipantRequest(
            participant=f"spaces/{space}/participants/{user}", may_publish=publish
        ),
        metadata=service_token(),
    )
    node = placed.node.removeprefix("mediaNodes/")
    return placed.node, media_grant(space, user, node, publish=publish, role=role)


async def negotiate(
    stub: pb_grpc.MediaServiceAsyncStub,
    signing_key: SigningKey,
    user: str,
    app: App,
    node: str,
    grant: str,
    *,
    rewrite: Callable[[str], str] | None = None,
) -> str:
    """Negotiate the app with ``node`` as the app does, with the user's token and grant
    (the answer passed through ``rewrite`` first, if given): the session's name."""
    answer = await stub.Negotiate(
        pb.NegotiateRequest(node=node, grant=grant, sdp_offer=await app.offer()),
        metadata=bearer(signing_key.mint(user)),
    )
    await app.accept(answer.sdp_answer if rewrite is None else rewrite(answer.sdp_answer))
    return answer.session


async def join(
    stub: pb_grpc.MediaServiceAsyncStub,
    signing_key: SigningKey,
    space: str,
    user: str,
    app: App,
    *,
    publish: bool,
    rewrite: Callable[[str], str] | None = None,
) -> str:
    """Place the user, sign their grant and negotiate, all through ``stub``: the session's
    name."""
    node, grant = await place(stub, space, user, publish=publish)
    return await negotiate(stub, signing_key, user, app, node, grant, rewrite=rewrite)
