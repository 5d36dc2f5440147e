"""Every private attribute of aiortc (1.16.0) and aioice (0.13.0) the engine touches.

The media engine keeps aiortc for ICE, DTLS and the RTCP packet formats, but takes RTP
before aiortc's decoder and sends it around aiortc's per-sender tasks. That needs a few
of their private attributes; they are all reached through this module, and
``tests/unit/media/test_aiortc_internals.py`` exercises each accessor against real
aiortc objects, so an upgrade that renames one fails loudly there (both versions are
pinned in ``requirements.lock``). pylibsrtp's private binding is in
:mod:`services.media.srtp_fastpath`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aioice.ice
import pylibsrtp
from aioice.candidate import Candidate
from aioice.ice import CandidatePair, Connection, StunProtocol
from aiortc import RTCDtlsTransport, RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver

logger = logging.getLogger(__name__)

__all__ = [
    "CONSENT_FAILURES",
    "add_local_candidate",
    "check_list",
    "forget_checks",
    "gathering_started",
    "ice_connection",
    "intercept_srtp",
    "srtp_tx_keying",
    "mark_gathering",
    "neutralize",
    "nominated_pair",
    "replace_gatherer",
    "send_rtp",
    "sender_ssrc",
    "consent_interval",
    "replace_consent",
    "set_local_credentials",
    "tie_breaker",
    "set_local_ufrag",
    "set_consent_interval",
    "set_nominated_pair",
    "set_sender_ssrc",
    "srtp_sessions",
]


# -- aioice ----------------------------------------------------------------------------

CONSENT_FAILURES: int = aioice.ice.CONSENT_FAILURES
"""Consecutive unanswered consent checks after which aioice closes a connection."""


def set_consent_interval(seconds: float) -> None:
    """Set aioice's mean interval between consent freshness checks (RFC 7675), process-wide
    (``aioice.ice.CONSENT_INTERVAL``; each check waits 0.8 to 1.2 times it).

    aioice's 5 s with 6 allowed failures can take up to 36 s to notice a peer that vanished;
    RFC 7675 wants sending stopped within 30 s.
    """
    aioice.ice.CONSENT_INTERVAL = seconds  # type: ignore[assignment]  # read as a float


def consent_interval() -> float:
    """aioice's mean interval between consent checks (``aioice.ice.CONSENT_INTERVAL``)."""
    return float(aioice.ice.CONSENT_INTERVAL)


def replace_consent(connection: Connection, keep: Callable[[], Awaitable[None]]) -> None:
    """Make ``connect()`` run ``keep`` where aioice would start its consent freshness task
    (``Connection.query_consent``, started once ICE completed and cancelled by
    ``close()``; an instance attribute shadows the method)."""
    connection.query_consent = keep  # type: ignore[method-assign,assignment]


def tie_breaker(connection: Connection) -> int:
    """The connection's ICE tie-breaker (``Connection._tie_breaker``), sent in checks."""
    value: int = connection._tie_breaker
    return value


def ice_connection(transceiver: RTCRtpTransceiver) -> Connection:
    """The aioice connection under a transceiver (``RTCIceTransport._connection``)."""
    connection: Connection = transceiver.receiver.transport.transport._connection
    return connection


def set_local_ufrag(connection: Connection, ufrag: str) -> None:
    """Replace the connection's ICE username fragment (``Connection._local_username``),
    before it is written into an answer."""
    connection._local_username = ufrag


def gathering_started(connection: Connection) -> bool:
    """``Connection._local_candidates_start``."""
    return bool(connection._local_candidates_start)


def mark_gathering(connection: Connection, *, started: bool, ended: bool = False) -> None:
    """Set ``Connection._local_candidates_start`` / ``_local_candidates_end``, as
    ``gather_candidates`` does."""
    connection._local_candidates_start = started
    connection._local_candidates_end = ended


def add_local_candidate(
    connection: Connection, protocol: StunProtocol | None, candidate: Candidate
) -> None:
    """Add a gathered candidate (``Connection._local_candidates``) and, when given, the
    protocol that serves it (``Connection._protocols``, which pairs are formed from)."""
    if protocol is not None:
        connection._protocols.append(protocol)
    connection._local_candidates.append(candidate)


def replace_gatherer(connection: Connection, gather: Callable[[], Awaitable[None]]) -> None:
    """Make aiortc's ``RTCIceGatherer.gather`` run ``gather`` instead of aioice's
    ``Connection.gather_candidates`` (an instance attribute shadows the method)."""
    connection.gather_candidates = gather  # type: ignore[method-assign,assignment]


def nominated_pair(connection: Connection) -> CandidatePair | None:
    """The nominated pair of component 1 (``Connection._nominated``), once ICE completed."""
    pair: CandidatePair | None = connection._nominated.get(1)
    return pair


def set_nominated_pair(connection: Connection, pair: CandidatePair) -> None:
    """Make ``pair`` the one aioice sends on and checks consent of
    (``Connection._nominated``), as ``check_complete`` does for a nominated pair."""
    connection._nominated[pair.component] = pair


def set_local_credentials(connection: Connection, ufrag: str, password: str) -> None:
    """Replace the connection's ICE username fragment and password
    (``Connection._local_username`` / ``_local_password``): what its STUN requests are
    signed with and incoming ones checked against, from the next message on."""
    connection._local_username = ufrag
    connection._local_password = password


def check_list(connection: Connection) -> list[CandidatePair]:
    """The connection's candidate pairs (``Connection._check_list``), a copy."""
    pairs: list[CandidatePair] = list(connection._check_list)
    return pairs


def forget_checks(connection: Connection) -> None:
    """Drop the check list and the remote candidates (``_check_list``,
    ``_remote_candidates``, ``_nominating``) for an ICE restart, cancelling checks still
    running; the nominated pair (``_nominated``) stays in use until a new one is
    nominated (RFC 8445 section 9)."""
    for pair in connection._check_list:
        if pair.task is not None:
            pair.task.cancel()
            pair.task = None
    connection._check_list.clear()
    connection._remote_candidates.clear()
    connection._nominating.clear()


# -- aiortc ----------------------------------------------------------------------------


def srtp_sessions(
    dtls: RTCDtlsTransport,
) -> tuple[pylibsrtp.Session | None, pylibsrtp.Session | None]:
    """The inbound and outbound SRTP sessions (``_rx_srtp``, ``_tx_srtp``), set when the
    DTLS handshake completes."""
    return dtls._rx_srtp, dtls._tx_srtp


def srtp_tx_keying(dtls: RTCDtlsTransport) -> tuple[bytes, bytes] | None:
    """The negotiated DTLS-SRTP profile and this side's sending master key and salt
    (concatenated), exported again from the DTLS session exactly as aiortc's
    ``_setup_srtp`` does for ``_tx_srtp`` (``_ssl``, ``_srtp_profiles``, ``_role``);
    ``None`` before the handshake completes."""
    ssl = dtls._ssl
    if ssl is None:
        return None
    selected = ssl.get_selected_srtp_profile()
    for profile in dtls._srtp_profiles:
        if profile.openssl_profile == selected:
            break
    else:
        return None
    keying = ssl.export_keying_material(
        b"EXTRACTOR-dtls_srtp", 2 * (profile.key_length + profile.salt_length)
    )
    return selected, profile.get_key_and_salt(keying, 1 if dtls._role == "server" else 0)


def intercept_srtp(
    dtls: RTCDtlsTransport,
    on_rtp: Callable[[bytes], None],
    on_rtcp: Callable[[bytes], None],
) -> None:
    """Take unprotected RTP and RTCP from aiortc's DTLS transport before its router and
    receivers (``_handle_rtp_data`` / ``_handle_rtcp_data``), so no decoder ever runs.

    This is the path for packets aioice delivers (before the mux's fast path is set up,
    or on a TURN-relayed pair)."""

    async def handle_rtp(data: bytes, arrival_time_ms: int = 0) -> None:
        on_rtp(data)

    async def handle_rtcp(data: bytes) -> None:
        on_rtcp(data)

    dtls._handle_rtp_data = handle_rtp  # type: ignore[method-assign]
    dtls._handle_rtcp_data = handle_rtcp  # type: ignore[method-assign]


async def send_rtp(dtls: RTCDtlsTransport, data: bytes) -> None:
    """aiortc's own protect-and-send of RTP or RTCP (``RTCDtlsTransport._send_rtp``)."""
    await dtls._send_rtp(data)


def sender_ssrc(sender: RTCRtpSender) -> int:
    """The SSRC aiortc announces for a sender (``RTCRtpSender._ssrc``)."""
    ssrc: int = sender._ssrc
    return ssrc


def set_sender_ssrc(sender: RTCRtpSender, ssrc: int) -> None:
    """Announce ``ssrc`` for the sender's m-line in the answer (``RTCRtpSender._ssrc``)."""
    sender._ssrc = ssrc


def neutralize(transceiver: RTCRtpTransceiver) -> None:
    """Keep aiortc from starting the transceiver's media tasks.

    ``RTCPeerConnection`` calls ``sender.send()`` and ``receiver.receive()`` once DTLS is
    up; they would start a per-sender RTP task (polling every 20 ms without a track), a
    decoder thread per receiver and RTCP tasks per sender and receiver. The engine
    forwards and runs RTCP itself, so both become no-ops (instance attributes shadowing
    the methods; ``stop()`` then has nothing to stop).
    """

    async def no_send(parameters: Any) -> None:
        return None

    async def no_receive(parameters: Any) -> None:
        return None

    sender: RTCRtpSender = transceiver.sender
    receiver: RTCRtpReceiver = transceiver.receiver
    sender.send = no_send  # type: ignore[method-assign]
    receiver.receive = no_receive  # type: ignore[method-assign]
