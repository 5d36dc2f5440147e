"""Media's gRPC surface in-process: who may call what, and how bad input is refused."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import av
import grpc
import httpx
import pytest
from spaces.media.v1 import media_resources_pb2 as media_res
from spaces.media.v1 import media_service_pb2 as pb
from spaces.media.v1 import media_service_pb2_grpc as pb_grpc
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_res
from spaces.rooms.v1 import rooms_service_pb2 as rooms_pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as rooms_grpc

from services.common.auth import StaticJwksSource, TokenVerifier
from services.common.grants import MediaGrantSigner
from services.common.server import Service
from services.gateway.app import GatewayConfig, create_app
from services.gateway.clients import ClientIdentifier
from services.gateway.descriptors import load_api
from services.gateway.ratelimit import MemoryRateLimiter, RateLimitGate
from services.gateway.transcoder.backend import Backend, BackendRouter
from tests.helpers.servers import bearer, plain_channel
from tests.helpers.tokens import SigningKey, jwks
from tests.integration.gateway.conftest import SERVICES, serving
from tests.integration.identity.harness import reason
from tests.integration.media.conftest import (
    GRANT_SECRET,
    AppFactory,
    MediaFactory,
    build_media,
    media_stub,
    negotiate,
    open_space,
    place,
    service_token,
)
from tests.integration.media.peers import App, Tone, eventually, heard


@pytest.fixture
async def media(start_media: MediaFactory) -> Service:
    return (await start_media("media-t")).service


async def test_every_call_needs_a_token_and_internal_ones_a_service(
    media: Service, signing_key: SigningKey
) -> None:
    async with media_stub(media.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.GetNodeStats(pb.GetNodeStatsRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as user:
            await stub.OpenSpace(
                pb.OpenSpaceRequest(space="spaces/s1"), metadata=bearer(signing_key.mint("alice"))
            )
        assert user.value.code() == grpc.StatusCode.PERMISSION_DENIED
        opened = await open_space(stub, "s1")
        assert opened.origin_node == "mediaNodes/media-t"
        stats = await stub.GetNodeStats(pb.GetNodeStatsRequest(), metadata=service_token())
        assert stats.stats.node == "mediaNodes/media-t" and stats.stats.capacity == 2000


async def test_bad_input_is_refused_with_field_violations(
    media: Service, signing_key: SigningKey
) -> None:
    async with media_stub(media.port) as stub:
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
    async with media_stub(media.port) as stub:
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
    async with media_stub(media.port) as stub:
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
    signing_key: SigningKey, apps: AppFactory, start_media: MediaFactory
) -> None:
    origin = (await start_media("media-a", capacity=1)).service
    edge = (await start_media("media-z")).service
    async with media_stub(origin.port) as to_origin, media_stub(edge.port) as to_edge:
        internal = to_edge  # any node answers placement
        opened = await open_space(internal, "s1")
        assert opened.origin_node == "mediaNodes/media-a", "the lowest id at equal load"

        async def join(user: str, app: App, publish: bool) -> str:
            node, grant = await place(internal, "s1", user, publish=publish, role="listener")
            stub = to_origin if node == "mediaNodes/media-a" else to_edge
            await negotiate(stub, signing_key, user, app, node, grant)
            return node.removeprefix("mediaNodes/")

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


class OpenRooms(rooms_grpc.RoomsServiceServicer):
    """Rooms as media sees it: every Space public and not ticketed; reports taken."""

    async def ReportPeerStates(
        self, request: Any, context: Any
    ) -> rooms_pb.ReportPeerStatesResponse:
        return rooms_pb.ReportPeerStatesResponse()

    async def GetSpace(self, request: Any, context: Any) -> rooms_pb.GetSpaceResponse:
        return rooms_pb.GetSpaceResponse(
            space=rooms_res.Space(name=request.name, host="users/alice", ticketed=False)
        )


@asynccontextmanager
async def gateway_to(media_port: int, signing_key: SigningKey) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway's HTTP API, with media at ``media_port`` (the rest unreachable)."""
    router = BackendRouter(
        {name: "127.0.0.1:1" for name in SERVICES} | {"media": f"127.0.0.1:{media_port}"}
    )
    verifier = TokenVerifier(StaticJwksSource(jwks(signing_key)), None)
    gate = RateLimitGate(
        MemoryRateLimiter(10_000, 10_000), ClientIdentifier(verifier), "test limit"
    )
    app = create_app(load_api(), Backend(router), gate, GatewayConfig())
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


async def test_a_recorded_space_that_ended_before_any_audio_has_a_playable_recording(
    redis_url: str, signing_key: SigningKey, apps: AppFactory, tmp_path: Path
) -> None:
    rooms = grpc.aio.server()
    rooms_grpc.add_RoomsServiceServicer_to_server(OpenRooms(), rooms)  # type: ignore[abstract]
    rooms_port = rooms.add_insecure_port("127.0.0.1:0")
    await rooms.start()
    media = build_media(
        redis_url,
        signing_key,
        rooms_addr=f"127.0.0.1:{rooms_port}",
        recordings_dir=tmp_path / "recordings",
    ).service
    await media.start()
    try:
        async with (
            plain_channel(media.port) as channel,
            gateway_to(media.port, signing_key) as http,
        ):
            stub = pb_grpc.MediaServiceStub(channel)
            await stub.OpenSpace(
                pb.OpenSpaceRequest(space="spaces/s1", record=True), metadata=service_token()
            )
            # A listener joins (the origin starts recording) and the Space ends at once:
            # no one spoke, and no frame of silence was due yet either.
            listener = apps("bob")
            token, _ = MediaGrantSigner(GRANT_SECRET).sign(
                space_id="s1", user_id="bob", role="listener", may_publish=False, node="media-t"
            )
            await listener.pc.setLocalDescription(await listener.pc.createOffer())
            joined = await stub.Negotiate(
                pb.NegotiateRequest(
                    node="mediaNodes/media-t",
                    grant=token,
                    sdp_offer=listener.pc.localDescription.sdp,
                ),
                metadata=bearer(signing_key.mint("bob")),
            )
            assert joined.recording, "the Space is being recorded"
            closed = await stub.CloseSpace(
                pb.CloseSpaceRequest(space="spaces/s1"), metadata=service_token()
            )

            (recording,) = closed.recordings
            assert recording.state == media_res.Recording.STATE_READY, recording
            assert recording.duration.ToTimedelta().total_seconds() == 0
            assert recording.size_bytes > 0

            headers = {"Authorization": f"Bearer {signing_key.mint('bob')}"}
            whole = await http.get(f"/v1/{recording.name}:read", headers=headers)
            assert whole.status_code == 200, whole.text
            assert whole.headers["content-type"] == "audio/ogg; codecs=opus"
            assert len(whole.content) == recording.size_bytes
            with av.open(io.BytesIO(whole.content), mode="r") as played:
                assert played.streams.audio[0].codec_context.name == "opus"
                assert sum(frame.samples for frame in played.decode(audio=0)) == 0

            first = await http.get(
                f"/v1/{recording.name}:read", headers=headers | {"Range": "bytes=0-3"}
            )
            assert first.status_code == 206
            assert first.content == b"OggS"
            assert first.headers["content-range"] == f"bytes 0-3/{recording.size_bytes}"
            tail = await http.get(
                f"/v1/{recording.name}:read", headers=headers | {"Range": "bytes=-3"}
            )
            assert tail.status_code == 206 and tail.content == whole.content[-3:]
    finally:
        await media.stop(grace=0)
        await rooms.stop(0)


@asynccontextmanager
async def open_rooms() -> AsyncIterator[str]:
    """An :class:`OpenRooms` server; yields its address."""
    rooms = grpc.aio.server()
    rooms_grpc.add_RoomsServiceServicer_to_server(OpenRooms(), rooms)  # type: ignore[abstract]
    port = rooms.add_insecure_port("127.0.0.1:0")
    await rooms.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await rooms.stop(0)


async def test_any_node_reads_a_recording_from_the_node_that_recorded_it(
    start_media: MediaFactory, signing_key: SigningKey, apps: AppFactory, tmp_path: Path
) -> None:
    """Without a shared volume, a read that reaches another node (the gateway sends it to
    any) is served by the recording's node, with the user's own access checked there."""
    async with open_rooms() as rooms_addr:
        nodes = {
            name: await start_media(name, rooms_addr=rooms_addr, recordings_dir=tmp_path / name)
            for name in ("media-a", "media-b")
        }
        async with media_stub(nodes["media-a"].service.port) as stub:
            await stub.OpenSpace(
                pb.OpenSpaceRequest(space="spaces/s2", record=True), metadata=service_token()
            )
            node, grant = await place(stub, "s2", "bob", publish=False)
        holder = node.removeprefix("mediaNodes/")
        (other,) = set(nodes) - {holder}
        async with media_stub(nodes[holder].service.port) as origin:
            await negotiate(origin, signing_key, "bob", apps("bob"), node, grant)
            await asyncio.sleep(1.5)  # the origin records a second of (silent) Space
            closed = await origin.CloseSpace(
                pb.CloseSpaceRequest(space="spaces/s2"), metadata=service_token()
            )
        (recording,) = closed.recordings
        assert recording.state == media_res.Recording.STATE_READY and recording.size_bytes > 0
        file = tmp_path / holder / "s2" / f"{recording.name.rsplit('/', 1)[1]}.ogg"
        content = file.read_bytes()
        assert not (tmp_path / other / "s2").exists(), "only the origin has the file"

        user = bearer(signing_key.mint("bob"))
        async with media_stub(nodes[other].service.port) as elsewhere:

            async def read(offset: int = 0, length: int = 0) -> bytes:
                request = pb.ReadRecordingRequest(name=recording.name, offset=offset, length=length)
                responses = [r async for r in elsewhere.ReadRecording(request, metadata=user)]
                assert responses[0].recording.name == recording.name
                return b"".join(r.data for r in responses)

            assert await read() == content
            assert await read(offset=4, length=10) == content[4:14]
            with pytest.raises(grpc.aio.AioRpcError) as past_the_end:
                await read(offset=recording.size_bytes)
            assert past_the_end.value.code() == grpc.StatusCode.OUT_OF_RANGE

            await nodes[holder].service.stop(grace=0)  # gone: nobody can serve the file
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await read()
            assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason(gone.value) == "RECORDING_NOT_LOCAL"
