"""Every private attribute of aiortc, aioice and pylibsrtp that media touches, exercised on
real objects: an upgrade that renames or changes one of them fails here, loudly.

The accessors live in ``services.media.aiortc_internals`` (aiortc/aioice) and
``services.media.srtp_fastpath`` (pylibsrtp); the versions are pinned in
``requirements.lock``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator

import aioice
import aioice.ice
import aiortc
import pylibsrtp
import pytest
from aioice.candidate import Candidate
from aioice.ice import CandidatePair, Connection, StunProtocol
from aiortc import RTCPeerConnection, RTCSessionDescription
from pylibsrtp import Policy, Session

from services.media import aiortc_internals as internals
from services.media.icemux import IceMux, MuxedStunProtocol
from services.media.rtp import build_header, is_rtcp
from services.media.srtp_fastpath import (
    SRTP_MAX_TRAILER,
    SRTP_OK,
    ProtectBuffers,
    srtp_protect,
    srtp_session_pointer,
)
from services.media.srtp_native import GcmSender


def test_the_pinned_versions_are_installed() -> None:
    """The internals below were checked against these versions only."""
    assert aiortc.__version__ == "1.16.0"
    assert aioice.__version__ == "0.13.0"
    assert pylibsrtp.__version__ == "1.0.0"


def test_consent_freshness_is_tunable_through_aioice_s_module_constants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aioice reads CONSENT_INTERVAL at every check and gives up after CONSENT_FAILURES."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", aioice.ice.CONSENT_INTERVAL)
    assert internals.CONSENT_FAILURES == aioice.ice.CONSENT_FAILURES == 6
    internals.set_consent_interval(3.5)
    assert aioice.ice.CONSENT_INTERVAL == 3.5
    source = __import__("inspect").getsource(Connection.query_consent)
    assert "CONSENT_INTERVAL" in source and "CONSENT_FAILURES" in source


@pytest.fixture
def loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


# -- pylibsrtp ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "key_length"),
    [
        (Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
        (Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
        (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    ],
)
def test_srtp_protect_in_place_matches_pylibsrtp(profile: int, key_length: int) -> None:
    """``pylibsrtp._binding.lib.srtp_protect`` on ``Session._srtp[0]`` protects exactly
    as ``Session.protect`` does."""
    key = os.urandom(key_length)

    def session() -> Session:
        policy = Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)
        policy.allow_repeat_tx = True
        return Session(policy)

    reference, fast = session(), session()
    buffers = ProtectBuffers(2, 1536)
    for seq in range(3):
        packet = build_header(0, 111, 1000 + seq, 960 * seq, 0x1234) + b"opus" * 20
        expected = reference.protect(packet)
        buffers.rows[0, : len(packet)] = list(packet)
        buffers.lengths[0] = len(packet)
        status = srtp_protect(
            srtp_session_pointer(fast), buffers.pointers[0], buffers.length_pointers[0]
        )
        assert status == SRTP_OK == 0
        assert buffers.packet(0) == expected
    assert SRTP_MAX_TRAILER == pylibsrtp.SRTP_MAX_TRAILER_LEN >= 16


# -- aioice ------------------------------------------------------------------------------


async def test_connection_private_state_drives_gathering_and_pairing() -> None:
    """``_local_username``, ``_local_candidates_start/_end``, ``_local_candidates``,
    ``_protocols`` and ``gather_candidates`` as an instance attribute, as
    ``IceMux.attach`` uses them; ``_nominated`` after a real ICE exchange."""
    mux = IceMux("127.0.0.1")
    await mux.start()
    ours = Connection(ice_controlling=False)
    theirs = Connection(ice_controlling=True)
    try:
        mux.attach(ours)
        assert len(ours.local_username) == 12  # internals.set_local_ufrag took effect
        assert not internals.gathering_started(ours)
        await ours.gather_candidates()  # replaced by the mux's gatherer
        assert internals.gathering_started(ours)
        [candidate] = ours.local_candidates
        assert (candidate.host, candidate.port, candidate.type) == ("127.0.0.1", mux.port, "host")
        assert isinstance(ours._protocols[0], MuxedStunProtocol)
        assert ours._local_candidates_end is True

        theirs_protocol_addresses = ["127.0.0.1"]
        await _gather_on(theirs, theirs_protocol_addresses)
        await _connect(ours, theirs)

        pair = internals.nominated_pair(ours)
        assert isinstance(pair, CandidatePair)
        assert isinstance(pair.protocol, MuxedStunProtocol)
        assert pair.remote_addr == (
            theirs.local_candidates[0].host,
            theirs.local_candidates[0].port,
        )
        # Data both ways through the mux (DTLS-like first byte: via data_received).
        await theirs.send(b"\x17hello")
        assert await asyncio.wait_for(ours.recv(), 5) == b"\x17hello"
        await ours.send(b"\x17world")
        assert await asyncio.wait_for(theirs.recv(), 5) == b"\x17world"
    finally:
        await ours.close()
        await theirs.close()
        mux.close()
    assert mux.sessions() == 0, "closing the connection left the mux"


async def test_ice_restart_state_credentials_check_list_and_nominated_pair() -> None:
    """``_local_username``/``_local_password``, ``_check_list``, ``_remote_candidates``,
    ``_nominating`` and ``_nominated``, as ``IceMux.restart`` and ``IceMux.follow`` use
    them: after a restart with new credentials on both sides, a check by the app nominates
    a pair again and data flows; setting the nominated pair moves aioice's sends."""
    mux = IceMux("127.0.0.1")
    await mux.start()
    ours = Connection(ice_controlling=False)
    theirs = Connection(ice_controlling=True)
    try:
        mux.attach(ours)
        await ours.gather_candidates()
        await _gather_on(theirs, ["127.0.0.1"])
        await _connect(ours, theirs)
        first = internals.nominated_pair(ours)
        assert first is not None and first in internals.check_list(ours)
        assert internals.check_list(ours) == ours._check_list
        assert internals.check_list(ours) is not ours._check_list, "a copy"
        old_ufrag = ours.local_username

        # The app restarts ICE: new credentials both ways.
        theirs._local_username, theirs._local_password = "appufrag2", "a" * 22
        password = mux.restart(ours, theirs.local_username, theirs.local_password)
        assert ours.local_username != old_ufrag and ours.local_password == password
        assert (ours.remote_username, ours.remote_password) == ("appufrag2", "a" * 22)
        assert ours._check_list == [] and ours._remote_candidates == []
        assert ours._nominating == set()
        assert internals.nominated_pair(ours) is first, "kept until a new nomination"
        theirs.remote_username, theirs.remote_password = ours.local_username, password
        [their_pair] = [p for p in theirs._check_list if p is theirs._nominated[1]]
        await asyncio.wait_for(theirs.check_start(their_pair), 5)  # nominates (controlling)
        for _ in range(100):
            if internals.nominated_pair(ours) is not first:
                break
            await asyncio.sleep(0.02)
        second = internals.nominated_pair(ours)
        assert second is not None and second is not first
        assert second.remote_addr == first.remote_addr
        await theirs.send(b"\x17again")
        assert await asyncio.wait_for(ours.recv(), 5) == b"\x17again"

        internals.set_nominated_pair(ours, first)
        assert internals.nominated_pair(ours) is first

        # forget_checks cancels a running check.
        blocker = asyncio.ensure_future(asyncio.sleep(10))
        second.task = blocker  # type: ignore[assignment]
        ours._check_list.append(second)
        internals.forget_checks(ours)
        await asyncio.sleep(0)
        assert blocker.cancelled() and second.task is None and ours._check_list == []
    finally:
        await ours.close()
        await theirs.close()
        mux.close()


def test_aioice_validates_ice_credentials_as_the_mux_expects() -> None:
    """``IceMux.restart`` relies on aioice's (public) credential checks raising
    ``ValueError``."""
    aioice.ice.validate_username("abcd")
    aioice.ice.validate_password("a" * 22)
    with pytest.raises(ValueError):
        aioice.ice.validate_username("a b")
    with pytest.raises(ValueError):
        aioice.ice.validate_password("short")


async def _connect(ours: Connection, theirs: Connection) -> None:
    """Exchange credentials and candidates of two gathered connections and connect them."""
    for a, b in ((ours, theirs), (theirs, ours)):
        a.remote_username = b.local_username
        a.remote_password = b.local_password
        for c in b.local_candidates:
            await a.add_remote_candidate(c)
        await a.add_remote_candidate(None)
    await asyncio.wait_for(asyncio.gather(ours.connect(), theirs.connect()), 10)


async def _gather_on(connection: Connection, addresses: list[str]) -> None:
    """Gather host candidates on given addresses with aioice's own code."""
    candidates = await connection.get_component_candidates(1, addresses=addresses)
    internals.mark_gathering(connection, started=True)
    for candidate in candidates:
        internals.add_local_candidate(connection, None, candidate)
    internals.mark_gathering(connection, started=True, ended=True)


async def test_get_component_candidates_without_addresses_gathers_nothing() -> None:
    """The mux gatherer asks aioice for relayed candidates only (no addresses)."""
    connection = Connection(ice_controlling=False)
    assert await connection.get_component_candidates(1, addresses=[]) == []
    await connection.close()


def test_stun_protocol_base_is_what_the_mux_protocol_extends() -> None:
    assert issubclass(MuxedStunProtocol, StunProtocol)
    for name in ("datagram_received", "send_stun", "send_data", "request"):
        assert callable(getattr(StunProtocol, name))
    for name in ("data_received", "protocol_lost", "request_received"):
        assert callable(getattr(Connection, name))
    assert "host" in Candidate.__init__.__code__.co_varnames  # the mux builds host candidates


# -- aiortc ------------------------------------------------------------------------------


@pytest.fixture
async def pair(loopback: None) -> AsyncIterator[tuple[RTCPeerConnection, RTCPeerConnection]]:
    """Two aiortc peers: an app (offerer, one sendonly m-line) and a media-like answerer
    with its transceiver neutralized and its SRTP intercepted."""
    app, media = RTCPeerConnection(), RTCPeerConnection()
    yield app, media
    await app.close()
    await media.close()


async def test_peer_connection_internals(
    pair: tuple[RTCPeerConnection, RTCPeerConnection],
) -> None:
    """``RTCIceTransport._connection`` (and aiortc gathering through the replaced
    ``gather_candidates``), ``RTCRtpSender._ssrc``, ``send``/``receive`` as instance
    attributes, ``RTCDtlsTransport._rx_srtp/_tx_srtp``, ``_handle_rtp_data`` /
    ``_handle_rtcp_data`` and ``_send_rtp``."""
    app, media = pair
    app_sender = app.addTransceiver("audio", direction="sendonly")
    await app.setLocalDescription(await app.createOffer())
    await media.setRemoteDescription(app.localDescription)
    [transceiver] = media.getTransceivers()

    connection = internals.ice_connection(transceiver)
    assert isinstance(connection, Connection)
    assert connection is transceiver.receiver.transport.transport.iceGatherer._connection
    mux = IceMux("127.0.0.1")
    await mux.start()
    mux.attach(connection)

    internals.set_sender_ssrc(transceiver.sender, 0xCAFE0001)
    assert internals.sender_ssrc(transceiver.sender) == 0xCAFE0001
    internals.neutralize(transceiver)
    transceiver.direction = "sendrecv"

    rtp: list[bytes] = []
    rtcp: list[bytes] = []
    dtls = transceiver.receiver.transport
    internals.intercept_srtp(dtls, rtp.append, rtcp.append)
    threads_before = {t.name for t in threading.enumerate()}

    await media.setLocalDescription(await media.createAnswer())
    answer = media.localDescription.sdp
    assert "a=ssrc:3405643777 " in answer  # 0xCAFE0001
    assert f"a=ice-ufrag:{connection.local_username}" in answer
    assert f"127.0.0.1 {mux.port} typ host" in answer, "gathered by the mux"
    await app.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    try:
        for _ in range(200):
            if dtls.state == "connected" and app.connectionState == "connected":
                break
            await asyncio.sleep(0.05)
        rx, tx = internals.srtp_sessions(dtls)
        assert isinstance(rx, pylibsrtp.Session) and isinstance(tx, pylibsrtp.Session)
        # AES-GCM is preferred when both sides offer it (here: the strongest, 256-bit).
        assert dtls._ssl.get_selected_srtp_profile() == b"SRTP_AEAD_AES_256_GCM"
        pair_ = internals.nominated_pair(connection)
        assert pair_ is not None and isinstance(pair_.protocol, MuxedStunProtocol)

        # The sending keys exported again (``_ssl``, ``_srtp_profiles``, ``_role``) are
        # the ones aiortc gave ``_tx_srtp``: the fast path's own AES-GCM protects exactly
        # as it does, and the app decrypts it.
        keying = internals.srtp_tx_keying(dtls)
        assert keying is not None and keying[0] == b"SRTP_AEAD_AES_256_GCM"
        gcm = GcmSender.for_profile(*keying)
        assert gcm is not None
        ours = build_header(0, 96, 40, 0, 0xCAFE0002) + b"\x01" * 40
        assert gcm.protect(ours) == tx.protect(ours)
        app_rx, _ = internals.srtp_sessions(app_sender.receiver.transport)
        assert app_rx is not None
        later = build_header(0, 96, 41, 960, 0xCAFE0002) + b"\x02" * 40
        assert app_rx.unprotect(gcm.protect(later)) == later

        # The app's RTP reaches the intercept, unprotected (through aioice and aiortc's
        # DTLS: the mux has no SRTP handler here); so does its RTCP (a sender report).
        packet = build_header(0, 96, 7, 960, 0xABCD) + b"\x00" * 40
        await internals.send_rtp(app_sender.receiver.transport, packet)
        await internals.send_rtp(dtls, build_header(0, 96, 1, 0, 0xCAFE0001) + b"\x00" * 40)
        for _ in range(100):
            if rtp and rtcp:
                break
            await asyncio.sleep(0.05)
        assert rtp and rtp[0] == packet
        assert rtcp and all(is_rtcp(p) for p in rtcp) and not any(is_rtcp(p) for p in rtp)

        # No decoder thread and no RTP task were started for the neutralized transceiver.
        new_threads = {t.name for t in threading.enumerate()} - threads_before
        assert not any("decoder" in name for name in new_threads)
    finally:
        await media.close()
        mux.close()


async def test_the_mux_keeps_consent_in_place_of_aioice(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Connection.query_consent`` is what ``connect()`` starts once ICE completed (the mux
    replaces it) and ``_tie_breaker`` is what checks carry: the app's own aioice consent
    checks are answered by the mux, the mux's checks by the app, and when the app goes
    away the mux expires consent and closes the connection, as aioice would."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.1)
    assert internals.consent_interval() == 0.1
    mux = IceMux("127.0.0.1")
    await mux.start()
    ours = Connection(ice_controlling=False)
    theirs = Connection(ice_controlling=True)
    try:
        assert internals.tie_breaker(ours) == ours._tie_breaker
        mux.attach(ours)
        await ours.gather_candidates()
        await _gather_on(theirs, ["127.0.0.1"])
        await _connect(ours, theirs)
        [protocol] = [p for p in ours._protocols if isinstance(p, MuxedStunProtocol)]
        await asyncio.sleep(0.05)
        assert protocol.consent is not None, "the mux keeps this session's consent"
        await asyncio.sleep(1.5)  # a dozen checks each way; 5 or 6 misses would expire a side
        assert theirs._query_consent_task is not None and not theirs._query_consent_task.done()
        assert protocol.consent is not None and protocol.consent.failures == 0
        assert protocol.remote_address in protocol.checked
        await theirs.close()  # the app goes away: nobody answers the mux's checks
        for _ in range(100):
            if ours._closing:
                break
            await asyncio.sleep(0.05)
        assert ours._closing and protocol.consent is None
    finally:
        await ours.close()
        await theirs.close()
        mux.close()
