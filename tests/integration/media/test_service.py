"""Media's gRPC surface in-process: who may call what, and how bad input is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from aiortc import RTCSessionDescription
from pydantic import SecretStr
from spaces.media.v1 import media_service_pb2 as pb
from spaces.media.v1 import media_service_pb2_grpc as pb_grpc

from services.common.auth import ServiceTokenIssuer, StaticJwksSource
from services.common.grants import MediaGrantSettings, MediaGrantSigner
from services.common.server import Service
from services.common.settings import CommonSettings
from services.media.main import build_service
from services.media.settings import MediaSettings
from tests.helpers.servers import bearer, plain_channel
from tests.helpers.tokens import TEST_INTERNAL_SECRET, SigningKey, jwks
from tests.integration.media.conftest import AppFactory
from tests.integration.media.peers import App, SlotRecorder, Tone, eventually, heard

GRANT_SECRET = "media-grant-secret-for-tests-0123456789abcdef"


def media_service(
    redis_url: str, signing_key: SigningKey, node_id: str = "media-t", capacity: int = 2000
) -> Service:
    service, _ = build_service(
        MediaSettings(
            grpc_host="127.0.0.1",
            grpc_port=0,
            metrics_port=None,
            node_id=node_id,
            ice_port=0,
            capacity=capacity,
            heartbeat_s=0.3,
            shutdown_grace_s=0.5,
            drain_grace_s=0.5,
        ),
        CommonSettings(
            redis_url=redis_url,
            internal_secret=SecretStr(TEST_INTERNAL_SECRET),
            rooms_addr="127.0.0.1:1",
            payments_addr="127.0.0.1:1",
        ),
        MediaGrantSettings(secret=SecretStr(GRANT_SECRET)),
        jwks=StaticJwksSource(jwks(signing_key)),
    )
    return service


@pytest.fixture
async def media(redis_url: str, signing_key: SigningKey) -> AsyncIterator[Service]:
    service = media_service(redis_url, signing_key)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace=0)


def service_token() -> tuple[tuple[str, str], ...]:
    return bearer(ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET).token())


async def test_every_call_needs_a_token_and_internal_ones_a_service(
    media: Service, signing_key: SigningKey
) -> None:
    async with plain_channel(media.port) as channel:
        stub = pb_grpc.MediaServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.GetNodeStats(pb.GetNodeStatsRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as user:
            await stub.OpenSpace(
                pb.OpenSpaceRequest(space="spaces/s1"), metadata=bearer(signing_key.mint("alice"))
            )
        assert user.value.code() == grpc.StatusCode.PERMISSION_DENIED
        opened = await stub.OpenSpace(
            pb.OpenSpaceRequest(space="spaces/s1"), metadata=service_token()
        )
        assert opened.origin_node == "mediaNodes/media-t"
        stats = await stub.GetNodeStats(pb.GetNodeStatsRequest(), metadata=service_token())
        assert stats.stats.node == "mediaNodes/media-t" and stats.stats.capacity == 2000


async def test_bad_input_is_refused_with_field_violations(
    media: Service, signing_key: SigningKey
) -> None:
    async with plain_channel(media.port) as channel:
        stub = pb_grpc.MediaServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Negotiate(
                pb.NegotiateRequest(node="Media Nodes/x", grant="", sdp_offer="hello"),
                metadata=bearer(signing_key.mint("alice")),
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for field in ("node", "grant", "sdp_offer"):
            assert field in (bad.value.details() or "")


async def test_a_service_cannot_negotiate_and_a_forged_grant_is_refused(
    media: Service, signing_key: SigningKey
) -> None:
    offer = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    async with plain_channel(media.port) as channel:
        stub = pb_grpc.MediaServiceStub(channel)
        request = pb.NegotiateRequest(node="mediaNodes/media-t", grant="forged", sdp_offer=offer)
        with pytest.raises(grpc.aio.AioRpcError) as service:
            await stub.Negotiate(request, metadata=service_token())
        assert service.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await stub.Negotiate(request, metadata=bearer(signing_key.mint("alice")))
        assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "invalid media grant" in (forged.value.details() or "")


async def test_unknown_sessions_and_nodes_are_not_found(
    media: Service, signing_key: SigningKey
) -> None:
    async with plain_channel(media.port) as channel:
        stub = pb_grpc.MediaServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.AddIceCandidate(
                pb.AddIceCandidateRequest(session="mediaNodes/media-t/sessions/abc", candidate=""),
                metadata=bearer(signing_key.mint("alice")),
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        left = await stub.LeaveSession(
            pb.LeaveSessionRequest(session="mediaNodes/media-t/sessions/abc"),
            metadata=bearer(signing_key.mint("alice")),
        )
        assert left == pb.LeaveSessionResponse(), "leaving a closed session succeeds"
        with pytest.raises(grpc.aio.AioRpcError) as node:
            await stub.GetNodeStats(
                pb.GetNodeStatsRequest(node="mediaNodes/nowhere"), metadata=service_token()
            )
        assert node.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_relay_between_two_media_processes_delivers_to_a_listener_on_the_edge(
    redis_url: str, signing_key: SigningKey, apps: AppFactory
) -> None:
    origin = media_service(redis_url, signing_key, "media-a", capacity=1)
    edge = media_service(redis_url, signing_key, "media-z")
    await origin.start()
    await edge.start()
    signer = MediaGrantSigner(GRANT_SECRET)
    try:
        async with plain_channel(origin.port) as to_origin, plain_channel(edge.port) as to_edge:
            internal = pb_grpc.MediaServiceStub(to_edge)  # any node answers placement
            opened = await internal.OpenSpace(
                pb.OpenSpaceRequest(space="spaces/s1"), metadata=service_token()
            )
            assert opened.origin_node == "mediaNodes/media-a", "the lowest id at equal load"

            async def join(user: str, app: App, publish: bool) -> str:
                placed = await internal.PlaceParticipant(
                    pb.PlaceParticipantRequest(
                        participant=f"spaces/s1/participants/{user}", may_publish=publish
                    ),
                    metadata=service_token(),
                )
                node = placed.node.removeprefix("mediaNodes/")
                token, _ = signer.sign(
                    space_id="s1", user_id=user, role="listener", may_publish=publish, node=node
                )
                await app.pc.setLocalDescription(await app.pc.createOffer())
                stub = pb_grpc.MediaServiceStub(to_origin if node == "media-a" else to_edge)
                answer = await stub.Negotiate(
                    pb.NegotiateRequest(
                        node=placed.node, grant=token, sdp_offer=app.pc.localDescription.sdp
                    ),
                    metadata=bearer(signing_key.mint(user)),
                )
                await app.pc.setRemoteDescription(
                    RTCSessionDescription(answer.sdp_answer, "answer")
                )
                app.recorder = SlotRecorder([t.receiver.track for t in app.slot_transceivers])
                return node

            assert await join("alice", apps("alice", Tone(440, 0.3)), True) == "media-a"
            for _ in range(50):  # until the registry shows the origin full
                full = await internal.GetNodeStats(
                    pb.GetNodeStatsRequest(node="mediaNodes/media-a"), metadata=service_token()
                )
                if full.stats.load >= 1.0:
                    break
                await asyncio.sleep(0.1)
            listener = apps("bob")
            assert await join("bob", listener, False) == "media-z"
            assert await eventually(lambda: heard(listener, 440), 15.0)
            stats = await internal.GetNodeStats(
                pb.GetNodeStatsRequest(node="mediaNodes/media-z"), metadata=service_token()
            )
            print(f"edge stats: {stats.stats.listener_count} listener(s)")
    finally:
        await edge.stop(grace=0)
        await origin.stop(grace=0)
