"""An app's calls through the gateway of a running suite: sign up, call an RPC by its
route, join a Space and negotiate a real aiortc peer with the granted media node."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from aiortc import RTCSessionDescription
from spaces.rooms.v1 import rooms_service_pb2 as rooms_pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as rooms_grpc

from tests.integration.media.peers import App, SlotRecorder, Tone
from tools.devstack import Stack


@contextlib.asynccontextmanager
async def gateway_client(stack: Stack, timeout: float = 20.0) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the running stack's gateway."""
    port = stack.services["gateway"].http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as http:
        yield http


@dataclass(frozen=True)
class Account:
    """A signed-up user: their id and the Authorization header of their access token."""

    user_id: str
    auth: dict[str, str]


async def call(
    client: httpx.AsyncClient, path: str, auth: dict[str, str], **body: Any
) -> dict[str, Any]:
    """POST ``body`` to ``path``; the JSON answer (anything but 200 fails the test)."""
    reply = await client.post(path, json=body, headers=auth)
    assert reply.status_code == 200, f"{path}: {reply.text}"
    result: dict[str, Any] = reply.json()
    return result


async def sign_up(client: httpx.AsyncClient, prefix: str) -> Account:
    """A new user with a unique handle starting with ``prefix``."""
    reply = await call(
        client,
        "/v1/users",
        {},
        user={"handle": f"{prefix}_{uuid.uuid4().hex[:8]}", "displayName": prefix},
        password="correct horse battery",
        requestId=str(uuid.uuid4()),
    )
    token = reply["tokens"]["accessToken"]
    return Account(reply["user"]["name"].split("/")[1], {"Authorization": f"Bearer {token}"})


async def join_and_connect(
    client: httpx.AsyncClient, auth: dict[str, str], space: str, app: App
) -> dict[str, Any]:
    """JoinSpace, then Negotiate on the granted node, as an app does; the app's slots are
    recorded from then on. Returns ``{"joined": ..., "answer": ...}``."""
    joined = await call(client, f"/v1/{space}:join", auth, requestId=str(uuid.uuid4()))
    grant = joined["mediaGrant"]
    await app.pc.setLocalDescription(await app.pc.createOffer())
    answer = await call(
        client,
        f"/v1/mediaNodes/{grant['endpoint']['node']}/sessions:negotiate",
        auth,
        grant=grant["token"],
        sdpOffer=app.pc.localDescription.sdp,
    )
    await app.pc.setRemoteDescription(RTCSessionDescription(answer["sdpAnswer"], "answer"))
    app.recorder = SlotRecorder([t.receiver.track for t in app.slot_transceivers])
    app.session = answer["session"]
    return {"joined": joined, "answer": answer}


class Member:
    """A user with an app connected to media, able to follow a media_reconnect event."""

    def __init__(self, client: httpx.AsyncClient, name: str, tone: Tone | None) -> None:
        self.client = client
        self.name = name
        self.tone = tone
        self.auth: dict[str, str] = {}
        self.token = ""
        self.app = App(name, tone)
        self.node = ""
        self.reconnects: list[Any] = []

    async def sign_up(self) -> None:
        reply = await self.client.post(
            "/v1/users",
            json={
                "user": {
                    "handle": f"{self.name[:6]}_{uuid.uuid4().hex[:8]}",
                    "displayName": self.name,
                },
                "password": "correct horse battery",
                "requestId": str(uuid.uuid4()),
            },
        )
        assert reply.status_code == 200, reply.text
        self.token = reply.json()["tokens"]["accessToken"]
        self.auth = {"Authorization": f"Bearer {self.token}"}

    async def post(self, path: str, **body: Any) -> Any:
        reply = await self.client.post(path, json=body, headers=self.auth)
        assert reply.status_code == 200, f"{path}: {reply.text}"
        return reply.json()

    async def join(self, space: str) -> None:
        joined = await self.post(f"/v1/{space}:join", requestId=str(uuid.uuid4()))
        await self.negotiate(
            joined["mediaGrant"]["token"], joined["mediaGrant"]["endpoint"]["node"]
        )

    async def negotiate(self, grant: str, node: str) -> None:
        self.node = node
        await self.app.pc.setLocalDescription(await self.app.pc.createOffer())
        answer = await self.post(
            f"/v1/mediaNodes/{node}/sessions:negotiate",
            grant=grant,
            sdpOffer=self.app.pc.localDescription.sdp,
        )
        await self.app.pc.setRemoteDescription(RTCSessionDescription(answer["sdpAnswer"], "answer"))
        self.app.recorder = SlotRecorder([t.receiver.track for t in self.app.slot_transceivers])

    async def follow_reconnects(self, rooms_port: int, space: str) -> None:
        """Watch the Space; on media_reconnect, negotiate again with the fresh grant."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rooms_port}") as channel:
            stream = rooms_grpc.RoomsServiceStub(channel).WatchSpace(
                rooms_pb.WatchSpaceRequest(name=space),
                metadata=(("authorization", f"Bearer {self.token}"),),
            )
            async for batch in stream:
                for event in batch.events:
                    if event.WhichOneof("event") != "media_reconnect":
                        continue
                    grant = event.media_reconnect.media_grant
                    self.reconnects.append(event.media_reconnect)
                    await self.app.close()
                    self.app = App(self.name, Tone(self.tone.freq, 0.3) if self.tone else None)
                    await self.negotiate(grant.token, grant.endpoint.node)
