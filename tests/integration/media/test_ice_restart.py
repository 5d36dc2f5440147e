"""ICE restart (issue #11): a listener whose address changes resumes audio without rejoining.

A real media process (gRPC servicer, node, engine on real Valkey) and real aiortc apps on
loopback. The listener reaches media through a :class:`~tests.helpers.ice_restart.UdpRelay`
(a NAT); when the relay moves to a new port, media's packets to the old one are lost, the
listener hears nothing, restarts ICE (``RestartIce`` with new credentials, checks again)
and hears the speaker again: same session, no new grant, never left the Space.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
from spaces.media.v1 import media_service_pb2 as pb
from spaces.media.v1 import media_service_pb2_grpc as pb_grpc

from services.media.session import Session
from tests.helpers.ice_restart import (
    UdpRelay,
    app_ice_connection,
    apply_restart_answer,
    restart_offer,
    route_via,
)
from tests.helpers.servers import bearer
from tests.helpers.tokens import SigningKey
from tests.integration.identity.harness import reason
from tests.integration.media.conftest import (
    AppFactory,
    MediaFactory,
    MediaProcess,
    join,
    media_stub,
    open_space,
)
from tests.integration.media.peers import App, Tone, eventually, heard_since

NODE = "media-r"
SPACE = "s-restart"


@dataclass
class Media(MediaProcess):
    """A started media process and the session states its node reported."""

    states: list[tuple[str, bool]]


@pytest.fixture
async def media(start_media: MediaFactory) -> Media:
    process = await start_media(NODE)
    states: list[tuple[str, bool]] = []
    engine = process.runtime.node.engine
    report = engine.on_session_state

    def record(session: Session, connected: bool) -> None:
        states.append((session.id, connected))
        if report is not None:
            report(session, connected)

    engine.on_session_state = record
    return Media(process.service, process.runtime, states)


def silent_since(app: App, since: float) -> bool:
    """No frame at all arrived in any slot after ``since``."""
    return all(not slot.times or slot.times[-1] <= since for slot in app.slots)


@asynccontextmanager
async def relayed_listener(
    media: Media, signing_key: SigningKey, apps: AppFactory
) -> AsyncIterator[tuple[pb_grpc.MediaServiceAsyncStub, UdpRelay, App, str]]:
    """The Space open, a speaker playing 440 Hz, and a listener behind a relay (a NAT):
    media's client, the relay, the listener and its session's name."""
    node_address = media.runtime.node.engine.address
    relay = UdpRelay(node_address)
    try:
        async with media_stub(media.service.port) as stub:
            await open_space(stub, SPACE)
            await join(
                stub, signing_key, SPACE, "alice", apps("alice", Tone(440, 0.3)), publish=True
            )
            listener = apps("bob")
            session = await join(
                stub,
                signing_key,
                SPACE,
                "bob",
                listener,
                publish=False,
                rewrite=lambda sdp: route_via(sdp, node_address, relay.address),
            )
            yield stub, relay, listener, session
    finally:
        relay.close()


async def test_a_listener_whose_address_changes_restarts_ice_and_hears_again(
    media: Media, signing_key: SigningKey, apps: AppFactory
) -> None:
    node = media.runtime.node
    node_address = node.engine.address
    async with relayed_listener(media, signing_key, apps) as (stub, relay, listener, session):
        session_id = session.rsplit("/", 1)[-1]
        t0 = time.monotonic()
        assert await eventually(lambda: heard_since(listener, 440, t0), 15.0)
        before = node.engine.session(session_id)
        assert before is not None and before.egress is not None
        assert before.egress.address == relay.source, "media sends to the relay's port"
        first_ufrag = app_ice_connection(listener.pc).remote_username

        # The listener's address changes: media's packets to the old port are lost.
        old_source = relay.source
        new_source = relay.rebind()
        changed = time.monotonic()
        assert await eventually(lambda: silent_since(listener, changed + 0.3), 5.0)
        await asyncio.sleep(0.5)
        assert silent_since(listener, changed + 0.5), "the listener hears nothing"

        # The app notices and restarts ICE with new credentials, keeping its session.
        offer = restart_offer(listener.pc)
        restarted = time.monotonic()
        reply = await stub.RestartIce(
            pb.RestartIceRequest(session=session, sdp_offer=offer),
            metadata=bearer(signing_key.mint("bob")),
        )
        answer = reply.sdp_answer
        ufrag = re.search(r"(?m)^a=ice-ufrag:(\S+)", answer)
        assert ufrag and ufrag.group(1) != first_ufrag, "media has new credentials"
        fingerprints = set(re.findall(r"(?m)^a=fingerprint:.*$", answer))
        assert fingerprints and fingerprints <= set(
            re.findall(r"(?m)^a=fingerprint:.*$", node_answer_of(before))
        ), "same DTLS fingerprint"
        await apply_restart_answer(listener.pc, route_via(answer, node_address, relay.address))
        assert await eventually(lambda: heard_since(listener, 440, restarted), 10.0)
        heard = time.monotonic()
        print(
            f"audio again {heard - changed:.2f} s after the address change, "
            f"{heard - restarted:.2f} s after RestartIce"
        )

        # Consent checks both ways pass with the new credentials: audio keeps coming.
        await asyncio.sleep(5.0)
        assert heard_since(listener, 440, time.monotonic() - 1.0), "still hearing"

        # Same session, forwarding to the new port only; it never left the Space.
        after = node.engine.session(session_id)
        assert after is before and after.egress is not None
        assert after.egress.address == new_source != old_source
        protocol = after.peer.muxed_protocol()
        assert protocol is not None and protocol.addresses == {new_source}
        assert node.engine.participant_sessions(SPACE, "bob") == 1
        assert (session_id, False) not in media.states, "the session never closed"
        assert listener.pc.connectionState == "connected"

        # No new grant was needed: Negotiate was called once per participant.
        assert [s.participant for s in node.engine.sessions()].count("bob") == 1


def renamed(offer: str) -> str:
    """The offer with its second m-line's mid renamed (in the line and in BUNDLE)."""
    offer = offer.replace("a=mid:1\r\n", "a=mid:9\r\n")
    return re.sub(r"(?m)^(a=group:BUNDLE 0) 1\b", r"\1 9", offer)


def node_answer_of(session: Session) -> str:
    """The answer media gave the session at Negotiate (its current local description)."""
    local = session.peer.pc.localDescription
    assert local is not None
    return str(local.sdp)


async def test_a_nat_rebinding_is_followed_without_a_restart(
    media: Media, signing_key: SigningKey, apps: AppFactory
) -> None:
    """The app's packets come from a new port with the same credentials: once the old
    port stops answering consent checks, media follows the new one by itself."""
    node = media.runtime.node
    async with relayed_listener(media, signing_key, apps) as (_, relay, listener, session):
        t0 = time.monotonic()
        assert await eventually(lambda: heard_since(listener, 440, t0), 15.0)
        new_source = relay.rebind()
        changed = time.monotonic()
        # The app's consent checks (every few seconds) reach media from the new port;
        # media's own check of the old port then fails, and it moves.
        assert await eventually(lambda: heard_since(listener, 440, changed + 0.5), 20.0)
        print(f"NAT rebinding followed: audio again {time.monotonic() - changed:.2f} s later")
        after = node.engine.session(session.rsplit("/", 1)[-1])
        assert after is not None and after.egress is not None
        assert after.egress.address == new_source


async def test_a_restart_on_the_same_address_keeps_audio_flowing(
    media: Media, signing_key: SigningKey, apps: AppFactory
) -> None:
    """An app that restarts ICE although its address did not change (a browser does after a
    short 'disconnected') keeps hearing throughout: media keeps its nominated pair until
    the app nominates one with the new credentials."""
    node = media.runtime.node
    async with media_stub(media.service.port) as stub:
        await open_space(stub, SPACE)
        speaker = apps("alice", Tone(440, 0.3))
        await join(stub, signing_key, SPACE, "alice", speaker, publish=True)
        listener = apps("bob")
        session = await join(stub, signing_key, SPACE, "bob", listener, publish=False)
        t0 = time.monotonic()
        assert await eventually(lambda: heard_since(listener, 440, t0), 15.0)
        live = node.engine.session(session.rsplit("/", 1)[-1])
        assert live is not None and live.peer.connection is not None
        pair = live.peer.connection._nominated[1]
        restarted = time.monotonic()
        reply = await stub.RestartIce(
            pb.RestartIceRequest(session=session, sdp_offer=restart_offer(listener.pc)),
            metadata=bearer(signing_key.mint("bob")),
        )
        await apply_restart_answer(listener.pc, reply.sdp_answer)
        assert await eventually(lambda: live.peer.connection._nominated[1] is not pair, 5.0)
        assert live.peer.connection._nominated[1].remote_addr == pair.remote_addr
        await asyncio.sleep(1.0)
        frames = sorted(t for slot in listener.slots for t in slot.times if t > restarted - 0.5)
        gaps = [b - a for a, b in zip(frames, frames[1:], strict=False)]
        assert frames and max(gaps) < 0.3, f"audio kept flowing (longest gap {max(gaps):.2f} s)"
        assert live.egress is not None and live.egress.address == pair.remote_addr


async def test_restart_ice_refuses_strangers_unknown_sessions_and_changed_m_lines(
    media: Media, signing_key: SigningKey, apps: AppFactory
) -> None:
    async with media_stub(media.service.port) as stub:
        await open_space(stub, SPACE)
        listener = apps("bob")
        session = await join(stub, signing_key, SPACE, "bob", listener, publish=False)
        offer = restart_offer(listener.pc)

        async def refused(name: str, sdp: str, user: str) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.RestartIce(
                    pb.RestartIceRequest(session=name, sdp_offer=sdp),
                    metadata=bearer(signing_key.mint(user)),
                )
            return caught.value

        stranger = await refused(session, offer, "mallory")
        assert stranger.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason(stranger) == "NOT_SESSION_OWNER"

        unknown = await refused(f"mediaNodes/{NODE}/sessions/0123abcd", offer, "bob")
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert reason(unknown) == "SESSION_NOT_FOUND"

        # One m-line fewer (the last slot dropped), then a renamed mid.
        sections = offer.split("\r\nm=")
        fewer = "\r\nm=".join(sections[:-1]) + "\r\n"
        fewer = re.sub(r"(?m)^(a=group:BUNDLE.*) \S+$", r"\1", fewer)
        for changed in (fewer, renamed(offer)):
            bad = await refused(session, changed, "bob")
            assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason(bad) == "INVALID_SDP"
        unparseable = await refused(session, "v=0\r\nnot an sdp\r\n", "bob")
        assert unparseable.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason(unparseable) == "INVALID_SDP"
        new_certificate = re.sub(
            r"(?m)^(a=fingerprint:sha-256 )\S+", r"\g<1>" + ":".join(["AB"] * 32), offer
        )
        bad_fingerprint = await refused(session, new_certificate, "bob")
        assert reason(bad_fingerprint) == "INVALID_SDP"

        # The refusals changed nothing: the real restart is still accepted.
        reply = await stub.RestartIce(
            pb.RestartIceRequest(session=session, sdp_offer=offer),
            metadata=bearer(signing_key.mint("bob")),
        )
        assert "a=ice-ufrag:" in reply.sdp_answer
