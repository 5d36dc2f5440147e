"""Media grants against the real media process (straight gRPC to MediaService.Negotiate).

A grant from rooms.JoinSpace opens a session only for the user it was issued to, in the
Space and on the node it names, while it is fresh, and while the user may still be there.
Everything else is refused with the code and reason media documents, before any media
resource is made. A grant is no access token either.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from aiortc import RTCPeerConnection

from services.common.grants import MediaGrantSigner
from tests.resilience.harness import Api, User, create_live_space, signup
from tools.devstack import Stack

DENIED = grpc.StatusCode.PERMISSION_DENIED


async def audio_offer() -> str:
    """An app's offer: one audio m-line to publish on, three recvonly listening slots."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    for _ in range(3):
        pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


@dataclass
class Grants:
    api: Api
    stack: Stack
    host: User
    listener: User
    removed: User
    other: User
    space: str
    ended_space: str
    grant: str  # listener's, for `space`
    node: str
    removed_grant: str
    ended_grant: str
    offer: str


async def _join(api: Api, user: User, space: str) -> tuple[str, str]:
    joined = await api.ok(
        "RoomsService.JoinSpace",
        token=user.token,
        name=f"spaces/{space}",
        request_id=str(uuid.uuid4()),
    )
    # The endpoint names the node bare ("media-3"); Negotiate takes its resource name.
    return joined.media_grant.token, f"mediaNodes/{joined.media_grant.endpoint.node}"


@pytest.fixture(scope="module")
async def grants(stack: Stack) -> AsyncIterator[Grants]:
    api = Api(stack)
    host, host2, listener, removed, other = [
        await signup(api, n) for n in ("ghost", "ghost2", "glis", "grem", "goth")
    ]
    space = await create_live_space(api, host, "grants")
    ended = await create_live_space(api, host2, "grants ended")
    grant, node = await _join(api, listener, space)
    removed_grant, _ = await _join(api, removed, space)
    ended_grant, _ = await _join(api, listener, ended)
    await api.ok(
        "RoomsService.RemoveParticipant",
        token=host.token,
        name=f"spaces/{space}/participants/{removed.id}",
    )
    await api.ok("RoomsService.EndSpace", token=host2.token, name=f"spaces/{ended}")
    try:
        yield Grants(
            api, stack, host, listener, removed, other, space, ended, grant, node,
            removed_grant, ended_grant, await audio_offer(),
        )  # fmt: skip
    finally:
        await api.close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def _with_claims(token: str, **changes: object) -> str:
    """The same signature over changed claims (what an attacker can do without the key)."""
    header, _, signature = token.split(".")
    claims = {**_claims(token), **changes}
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


async def _negotiate(g: Grants, user: User, grant: str, node: str | None = None) -> tuple[str, str]:
    result = await g.api.call(
        "MediaService.Negotiate",
        token=user.token,
        node=node or g.node,
        grant=grant,
        sdp_offer=g.offer,
    )
    return result.code.name, result.reason


async def test_a_fresh_grant_opens_one_session_and_a_replay_is_refused(grants: Grants) -> None:
    first = await _negotiate(grants, grants.listener, grants.grant)
    replay = await _negotiate(grants, grants.listener, grants.grant)
    print(f"\nmedia grants: first use {first}, replay {replay}")
    assert first == ("OK", "")
    assert replay == (DENIED.name, "GRANT_ALREADY_USED")


async def test_every_misused_grant_is_refused(grants: Grants) -> None:
    g = grants
    secret = g.stack.shared_secret("media-grant-secret")
    claims = _claims(g.grant)
    old = datetime.now(UTC) - timedelta(minutes=10)
    expired, _ = MediaGrantSigner(secret).sign(
        space_id=g.space, user_id=g.listener.id, role="listener", may_publish=False,
        node=str(claims["node"]), now=old,
    )  # fmt: skip
    foreign, _ = MediaGrantSigner("not-the-grant-secret-0123456789abcdef").sign(
        space_id=g.space, user_id=g.listener.id, role="speaker", may_publish=True,
        node=str(claims["node"]),
    )  # fmt: skip
    cases = {
        "another user's grant": (g.other, g.grant, None, "GRANT_USER_MISMATCH"),
        "grant moved to another Space": (
            g.listener, _with_claims(g.grant, space=g.ended_space), None, "GRANT_INVALID",
        ),
        "grant raised to publisher": (
            g.listener, _with_claims(g.grant, may_publish=True, role="speaker"), None,
            "GRANT_INVALID",
        ),
        "expired grant": (g.listener, expired, None, "GRANT_EXPIRED"),
        "grant signed with another key": (g.listener, foreign, None, "GRANT_INVALID"),
        "grant of a removed participant": (g.removed, g.removed_grant, None, "PARTICIPANT_REMOVED"),
        "garbage": (g.listener, "not-a-grant", None, "GRANT_INVALID"),
    }  # fmt: skip
    wrong = []
    for label, (user, grant, node, reason) in cases.items():
        got = await _negotiate(g, user, grant, node)
        if got != (DENIED.name, reason):
            wrong.append(f"{label}: got {got}, want {DENIED.name} {reason}")
    ended = await _negotiate(g, g.listener, g.ended_grant)
    if ended != ("FAILED_PRECONDITION", "SPACE_ENDED"):
        wrong.append(f"grant of an ended Space: got {ended}")
    other_node = await _negotiate(g, g.listener, g.grant, "mediaNodes/some-other-node")
    if other_node[0] == "OK":
        wrong.append("a grant for one node opened a session on another")
    print(
        f"\nmedia grants: {len(cases) + 2} misuses tried, {len(wrong)} accepted or mis-coded;"
        f" other node -> {other_node}"
    )
    assert not wrong, "\n".join(wrong)


async def test_a_grant_is_not_an_access_token(grants: Grants) -> None:
    result = await grants.api.call(
        "RoomsService.GetSpace", token=grants.grant, name=f"spaces/{grants.space}"
    )
    assert result.code == grpc.StatusCode.UNAUTHENTICATED
