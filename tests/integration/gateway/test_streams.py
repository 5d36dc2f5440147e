"""Server streams over WebSocket (with resume) and NDJSON, and byte ranges of recordings."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from spaces.media.v1 import media_resources_pb2, media_service_pb2
from spaces.rooms.v1 import rooms_events_pb2, rooms_service_pb2
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers.tokens import SigningKey
from tests.integration.gateway.conftest import GatewayUnderTest, endless, ws_url

WATCH = "/spaces.rooms.v1.RoomsService/WatchSpace"
SUBSCRIBE = "/spaces.notify.v1.NotifyService/SubscribeNotifications"
READ = "/spaces.media.v1.MediaService/ReadRecording"
FILE = bytes(range(256)) * 10  # 2560 bytes


async def numbered_events(request: Message, context: Any) -> AsyncIterator[Message]:
    """Events 1..5, starting after the resume token's event; fails after 5 on 'failing'."""
    assert isinstance(request, rooms_service_pb2.WatchSpaceRequest)
    start = int(request.resume_token.removeprefix("t")) + 1 if request.resume_token else 1
    for sequence in range(start, 6):
        event = rooms_events_pb2.SpaceEvent(sequence=sequence, resume_token=f"t{sequence}")
        yield rooms_service_pb2.WatchSpaceResponse(events=[event])
        await asyncio.sleep(0)
    if request.name == "spaces/failing":
        await context.abort(grpc.StatusCode.NOT_FOUND, "the Space is gone")


@pytest.fixture
def watching(gw: GatewayUnderTest) -> GatewayUnderTest:
    gw.double.streams[WATCH] = numbered_events
    return gw


async def test_websocket_streams_and_resumes(
    watching: GatewayUnderTest, signing_key: SigningKey
) -> None:
    token = signing_key.mint("alice")
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(ws_url(watching, "/v1/spaces/abc:watch"), additional_headers=headers) as ws:
        first = [json.loads(await ws.recv()) for _ in range(3)]
    assert [f["events"][0]["sequence"] for f in first] == ["1", "2", "3"]
    call = watching.double.last()
    assert call.method == WATCH
    assert call.metadata["authorization"] == f"Bearer {token}"
    assert call.request.name == "spaces/abc"  # type: ignore[attr-defined]
    resume = first[-1]["events"][0]["resumeToken"]
    url = ws_url(watching, f"/v1/spaces/abc:watch?resume_token={resume}")
    async with connect(url, additional_headers=headers) as ws:
        rest = [json.loads(frame) async for frame in ws]
        assert ws.close_code == 1000
    assert [f["events"][0]["sequence"] for f in rest] == ["4", "5"]
    assert watching.double.last().request.resume_token == "t3"  # type: ignore[attr-defined]


async def test_websocket_token_from_query_or_subprotocol(
    watching: GatewayUnderTest, signing_key: SigningKey
) -> None:
    token = signing_key.mint("bob")
    async with connect(ws_url(watching, f"/v1/spaces/abc:watch?access_token={token}")) as ws:
        await ws.recv()
    assert watching.double.last().metadata["authorization"] == f"Bearer {token}"
    async with connect(
        ws_url(watching, "/v1/spaces/abc:watch"),
        subprotocols=["bearer", token],  # type: ignore[list-item]
    ) as ws:
        assert ws.subprotocol == "bearer"
        await ws.recv()
    assert watching.double.last().metadata["authorization"] == f"Bearer {token}"


async def test_websocket_error_frame_then_close(watching: GatewayUnderTest) -> None:
    frames: list[Any] = []
    async with connect(ws_url(watching, "/v1/spaces/failing:watch")) as ws:
        with pytest.raises(ConnectionClosed):
            while True:
                frames.append(json.loads(await ws.recv()))
        assert ws.close_code == 4404
        assert ws.close_reason == "the Space is gone"
    assert len(frames) == 6
    assert frames[-1] == {"error": {"code": 5, "message": "the Space is gone", "details": []}}


async def test_websocket_on_unknown_route_closes_with_status(gw: GatewayUnderTest) -> None:
    async with connect(ws_url(gw, "/v1/nothing:watch")) as ws:
        frame = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 4404
    assert frame["error"]["details"][0]["reason"] == "ROUTE_NOT_FOUND"


async def test_client_leaving_cancels_the_backend_stream(gw: GatewayUnderTest) -> None:
    cancelled = asyncio.Event()

    async def watched(request: Message, context: Any) -> AsyncIterator[Message]:
        try:
            async for message in endless(request, context):
                yield message
        finally:
            cancelled.set()

    gw.double.streams[WATCH] = watched
    async with connect(ws_url(gw, "/v1/spaces/abc:watch")) as ws:
        await ws.recv()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_other_streams_are_websockets_too(gw: GatewayUnderTest) -> None:
    async with connect(ws_url(gw, "/v1/users/me/notifications:subscribe")) as ws:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1000
    assert gw.double.last().method == SUBSCRIBE
    assert gw.double.last().request.parent == "users/me"  # type: ignore[attr-defined]


async def test_ndjson_for_plain_get(watching: GatewayUnderTest) -> None:
    response = await watching.client.get("/v1/spaces/failing:watch?resume_token=t2")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["events"][0]["sequence"] for line in lines[:-1]] == ["3", "4", "5"]
    assert lines[-1]["error"]["code"] == 5


async def test_ndjson_immediate_error_has_its_status(gw: GatewayUnderTest) -> None:
    async def refuse(request: Message, context: Any) -> AsyncIterator[Message]:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        yield rooms_service_pb2.WatchSpaceResponse()

    gw.double.streams[WATCH] = refuse
    response = await gw.client.get("/v1/spaces/abc:watch")
    assert response.status_code == 403


async def serve_file(request: Message, context: Any) -> AsyncIterator[Message]:
    assert isinstance(request, media_service_pb2.ReadRecordingRequest)
    if request.offset >= len(FILE):
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "offset past the end")
    end = len(FILE) if request.length == 0 else min(len(FILE), request.offset + request.length)
    yield media_service_pb2.ReadRecordingResponse(
        recording=media_resources_pb2.Recording(
            name=request.name, size_bytes=len(FILE), format="audio/ogg"
        ),
        offset=request.offset,
    )
    for start in range(request.offset, end, 1000):
        yield media_service_pb2.ReadRecordingResponse(
            offset=start, data=FILE[start : min(end, start + 1000)]
        )


@pytest.fixture
def recordings(gw: GatewayUnderTest) -> GatewayUnderTest:
    gw.double.streams[READ] = serve_file
    return gw


RECORDING = "/v1/spaces/abc/recordings/r1:read"


async def test_whole_recording(recordings: GatewayUnderTest) -> None:
    response = await recordings.client.get(RECORDING)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/ogg"
    assert response.headers["accept-ranges"] == "bytes"
    assert response.content == FILE
    assert recordings.double.last().request.name == "spaces/abc/recordings/r1"  # type: ignore[attr-defined]


async def test_byte_range(recordings: GatewayUnderTest) -> None:
    response = await recordings.client.get(RECORDING, headers={"Range": "bytes=100-1299"})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 100-1299/{len(FILE)}"
    assert response.content == FILE[100:1300]
    request = recordings.double.last().request
    assert (request.offset, request.length) == (100, 1200)  # type: ignore[attr-defined]


async def test_open_and_suffix_ranges(recordings: GatewayUnderTest) -> None:
    tail = await recordings.client.get(RECORDING, headers={"Range": "bytes=2500-"})
    assert tail.status_code == 206
    assert tail.content == FILE[2500:]
    assert tail.headers["content-range"] == f"bytes 2500-2559/{len(FILE)}"
    suffix = await recordings.client.get(RECORDING, headers={"Range": "bytes=-10"})
    assert suffix.status_code == 206
    assert suffix.content == FILE[-10:]
    past_end = await recordings.client.get(RECORDING, headers={"Range": "bytes=2550-9999"})
    assert past_end.status_code == 206
    assert past_end.content == FILE[2550:]


async def test_unsatisfiable_range(recordings: GatewayUnderTest) -> None:
    response = await recordings.client.get(RECORDING, headers={"Range": "bytes=5000-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(FILE)}"
    assert response.json()["details"][0]["reason"] == "RANGE_NOT_SATISFIABLE"


async def test_malformed_range_is_ignored(recordings: GatewayUnderTest) -> None:
    response = await recordings.client.get(RECORDING, headers={"Range": "bytes=9-3"})
    assert response.status_code == 200
    assert response.content == FILE


async def test_recording_errors_are_json(gw: GatewayUnderTest) -> None:
    async def missing(request: Message, context: Any) -> AsyncIterator[Message]:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such recording")
        yield media_service_pb2.ReadRecordingResponse()

    gw.double.streams[READ] = missing
    response = await gw.client.get(RECORDING, headers={"Range": "bytes=0-9"})
    assert response.status_code == 404
    assert response.json()["message"] == "no such recording"


async def test_websocket_tokens_never_reach_the_logs(
    watching: GatewayUnderTest, signing_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    from services.common.logs import RedactionFilter

    token = signing_key.mint("carol")
    caplog.set_level(logging.DEBUG)
    async with connect(ws_url(watching, f"/v1/spaces/abc:watch?access_token={token}")) as ws:
        await ws.recv()
    redaction = RedactionFilter()
    server_records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert any("watch" in r.getMessage() for r in server_records)  # the access log
    for record in server_records:
        # What the process's log handler writes: the record after redaction.
        redaction.filter(record)
        assert token[-20:] not in record.getMessage()


async def test_websocket_connects_are_rate_limited(signing_key: SigningKey) -> None:
    from services.gateway.ratelimit import MemoryRateLimiter
    from tests.integration.gateway.conftest import gateway_with_double

    async with gateway_with_double(signing_key, limiter=MemoryRateLimiter(0.1, 1)) as running:
        running.double.streams[WATCH] = numbered_events
        async with connect(ws_url(running, "/v1/spaces/abc:watch")) as ws:
            await ws.recv()
        async with connect(ws_url(running, "/v1/spaces/abc:watch")) as ws:
            frame = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4429
        assert frame["error"]["code"] == 8
