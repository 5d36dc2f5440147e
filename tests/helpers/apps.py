"""An app's calls through the gateway of a running suite: sign up, call an RPC by its
route, join a Space and negotiate a real aiortc peer with the granted media node."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from aiortc import RTCSessionDescription

from tests.integration.media.peers import App, SlotRecorder


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
