"""One session's ``RTCPeerConnection``, shaped for forwarding.

aiortc answers the app's offer and runs ICE (on the node's mux) and DTLS; everything
media-specific is set up around it here:

* the offer is restricted to Opus before aiortc sees it (:func:`sdp.restrict_to_opus`);
* the publish m-line is answered ``recvonly``, the first N ``recvonly`` m-lines
  ``sendonly`` with the room's slot SSRCs, any other m-line ``inactive``;
* aiortc's per-transceiver media tasks are never started
  (:func:`aiortc_internals.neutralize`);
* unprotected RTP/RTCP is taken from the DTLS transport before aiortc's router
  (:func:`aiortc_internals.intercept_srtp`), and from the mux directly once connected.

aiortc cannot restart ICE; :meth:`Peer.restart_ice` does it on the mux
(:meth:`IceMux.restart`) and answers from the first answer with new ICE credentials, so the
DTLS association and SRTP contexts carry on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
from collections.abc import Callable

from aioice.ice import Connection
from aiortc import (
    RTCConfiguration,
    RTCDtlsTransport,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from services.common.errors import InvalidArgument, NotFound
from services.media import aiortc_internals as internals
from services.media.config import MediaConfig
from services.media.icemux import IceMux, MuxedStunProtocol
from services.media.sdp import AudioLine, Offer, parse_offer, restrict_to_opus, tune_answer

logger = logging.getLogger(__name__)

__all__ = ["IceParameters", "Layout", "Peer", "ice_parameters"]

_ICE_UFRAG = re.compile(r"^a=ice-ufrag:(\S+)\s*$", re.MULTILINE)
_ICE_PWD = re.compile(r"^a=ice-pwd:(\S+)\s*$", re.MULTILINE)
_FINGERPRINT = re.compile(r"^a=fingerprint:(\S+) ([0-9A-Fa-f:]+)\s*$", re.MULTILINE)
_ORIGIN = re.compile(r"^(o=\S+ \S+ )(\d+)( .*)$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class IceParameters:
    """The ICE credentials and DTLS fingerprints of an SDP.

    :param ufrag: the first ``a=ice-ufrag`` (one for all m-lines: they are bundled).
    :param password: the first ``a=ice-pwd``.
    :param fingerprints: every ``a=fingerprint`` as ``(algorithm, HEX)``, normalized.
    """

    ufrag: str | None
    password: str | None
    fingerprints: frozenset[tuple[str, str]]


def ice_parameters(sdp: str) -> IceParameters:
    """Read the ICE credentials and DTLS fingerprints of an SDP."""
    ufrag = _ICE_UFRAG.search(sdp)
    password = _ICE_PWD.search(sdp)
    return IceParameters(
        ufrag.group(1) if ufrag else None,
        password.group(1) if password else None,
        frozenset((m.group(1).lower(), m.group(2).upper()) for m in _FINGERPRINT.finditer(sdp)),
    )


def _restarted_answer(answer: str, ufrag: str, password: str) -> str:
    """The first answer with new ICE credentials and the next session version
    (RFC 3264 section 8: a changed description increments it)."""
    answer = _ICE_UFRAG.sub(lambda _: f"a=ice-ufrag:{ufrag}", answer)
    answer = _ICE_PWD.sub(lambda _: f"a=ice-pwd:{password}", answer)
    return _ORIGIN.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + 1}{m.group(3)}", answer, 1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a session's m-lines are used for.

    :param publish: the line the app publishes on (Opus), or ``None``.
    :param slots: the listening slot lines, in slot order.
    :param slot_payload_type: the Opus payload type of the slot lines (``-1``: no slots).
    """

    publish: AudioLine | None
    slots: tuple[AudioLine, ...]
    slot_payload_type: int

    @classmethod
    def of(cls, offer: Offer, slot_count: int) -> Layout:
        """Pick the lines of an offer.

        :raises InvalidArgument: (``INVALID_SDP``) when the slot lines disagree on the
            Opus payload type.
        """
        publish = next((line for line in offer.lines if line.publishes and line.opus_pt), None)
        slots = tuple(
            line for line in offer.lines if line.direction == "recvonly" and line.opus_pt
        )[:slot_count]
        types = {line.opus_pt for line in slots}
        if len(types) > 1:
            raise InvalidArgument(
                "the slot m-lines must use one Opus payload type", reason="INVALID_SDP"
            )
        payload_type = slots[0].opus_pt if slots and slots[0].opus_pt is not None else -1
        return cls(publish, slots, payload_type)


class Peer:
    """The peer connection of one session.

    :param config: engine settings (ICE servers).
    :param mux: the node's ICE mux.
    :param layout: the session's line usage.
    :param slot_ssrcs: the SSRC of each slot (declared in the answer).
    :param on_rtp: called with every unprotected RTP packet aiortc's DTLS delivers.
    :param on_rtcp: called with every unprotected RTCP packet aiortc's DTLS delivers.
    :param on_connected: called once DTLS is up (SRTP keys exist).
    :param on_closed: called once when the connection failed or closed.
    """

    def __init__(
        self,
        config: MediaConfig,
        mux: IceMux,
        layout: Layout,
        slot_ssrcs: tuple[int, ...],
        on_rtp: Callable[[bytes], None],
        on_rtcp: Callable[[bytes], None],
        on_connected: Callable[[], None],
        on_closed: Callable[[], None],
    ) -> None:
        self.layout = layout
        self.cname = secrets.token_hex(8)
        servers = [
            RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in config.ice_servers
        ]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self._mux = mux
        self._slot_ssrcs = slot_ssrcs
        self._on_rtp = on_rtp
        self._on_rtcp = on_rtcp
        self._on_connected = on_connected
        self._on_closed = on_closed
        self._closed = False
        self._slot_count = config.slot_count
        self._mids: tuple[str, ...] = ()
        self._offer_ice: IceParameters | None = None
        self._answer = ""
        self._restart_lock = asyncio.Lock()
        self.dtls: RTCDtlsTransport | None = None
        self.connection: Connection | None = None
        self.receiver_ssrc = 0

    async def answer(self, offer_sdp: str) -> str:
        """Apply the app's offer and return media's answer (with all its candidates).

        :raises InvalidArgument: (``INVALID_SDP``) when aiortc cannot use the offer.
        """
        description = RTCSessionDescription(sdp=restrict_to_opus(offer_sdp), type="offer")
        try:
            await self.pc.setRemoteDescription(description)
        except (ValueError, AssertionError) as exc:
            raise InvalidArgument(f"the offer was refused: {exc}", reason="INVALID_SDP") from exc
        except Exception as exc:  # aiortc's OperationError and friends
            raise InvalidArgument(f"the offer was refused: {exc}", reason="INVALID_SDP") from exc
        by_mid = {t.mid: t for t in self.pc.getTransceivers()}
        slot_mids = {line.mid: k for k, line in enumerate(self.layout.slots)}
        publish_mid = self.layout.publish.mid if self.layout.publish else None
        dtls: RTCDtlsTransport | None = None
        for mid, transceiver in by_mid.items():
            internals.neutralize(transceiver)
            if mid in slot_mids:
                transceiver.direction = "sendonly"
                internals.set_sender_ssrc(transceiver.sender, self._slot_ssrcs[slot_mids[mid]])
            elif mid == publish_mid:
                transceiver.direction = "recvonly"
                while internals.sender_ssrc(transceiver.sender) in self._slot_ssrcs:
                    internals.set_sender_ssrc(transceiver.sender, secrets.randbits(32) or 1)
                self.receiver_ssrc = internals.sender_ssrc(transceiver.sender)
            else:
                transceiver.direction = "inactive"
            if dtls is None:
                dtls = transceiver.receiver.transport
            elif transceiver.receiver.transport is not dtls:
                raise InvalidArgument("the offer must BUNDLE its m-lines", reason="INVALID_SDP")
        if dtls is None:
            raise InvalidArgument("the offer has no usable m-line", reason="INVALID_SDP")
        if not self.receiver_ssrc:
            self.receiver_ssrc = secrets.randbits(31) | 1
        self.dtls = dtls
        self.connection = internals.ice_connection(next(iter(by_mid.values())))
        self._mux.attach(self.connection)
        internals.intercept_srtp(dtls, self._on_rtp, self._on_rtcp)
        dtls.on("statechange", self._dtls_state)
        self.pc.on("connectionstatechange", self._pc_state)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        self._mids = tuple(line.mid for line in parse_offer(offer_sdp).lines)
        self._offer_ice = ice_parameters(offer_sdp)
        self._answer = tune_answer(self.pc.localDescription.sdp)
        return self._answer

    async def restart_ice(self, offer_sdp: str) -> str:
        """Restart ICE with the app's new offer; return media's answer.

        The offer must keep the session's m-lines (same mids, same publish and slot
        lines) and its DTLS fingerprint, and carry ICE credentials (new ones, normally).
        Media answers with new credentials of its own and the same fingerprint, setup
        role and candidates; the session moves to the app's new address once the app
        nominates a pair there (see :meth:`IceMux.follow`).

        :raises InvalidArgument: (``INVALID_SDP``) when the offer does not parse,
            changes the m-lines or the fingerprint, or lacks ICE credentials.
        :raises NotFound: (``SESSION_NOT_FOUND``) when the connection has closed.
        """
        offer = parse_offer(offer_sdp)
        if tuple(line.mid for line in offer.lines) != self._mids or (
            Layout.of(offer, self._slot_count) != self.layout
        ):
            raise InvalidArgument(
                "an ICE restart keeps the session's m-lines; negotiate a new session to "
                "change them",
                reason="INVALID_SDP",
            )
        params = ice_parameters(offer_sdp)
        if self._offer_ice is None or self.connection is None or self._closed:
            # Not answered yet (its name is not out before Negotiate returns) or gone.
            raise NotFound("no such media session", reason="SESSION_NOT_FOUND")
        if params.fingerprints != self._offer_ice.fingerprints:
            raise InvalidArgument(
                "an ICE restart keeps the DTLS fingerprint; negotiate a new session for a "
                "new certificate",
                reason="INVALID_SDP",
            )
        if params.ufrag is None or params.password is None:
            raise InvalidArgument("the offer has no ICE credentials", reason="INVALID_SDP")
        async with self._restart_lock:
            try:
                password = self._mux.restart(self.connection, params.ufrag, params.password)
            except LookupError as exc:
                raise NotFound("no such media session", reason="SESSION_NOT_FOUND") from exc
            except ValueError as exc:
                raise InvalidArgument(
                    f"the offer's ICE credentials are refused: {exc}", reason="INVALID_SDP"
                ) from exc
            self._offer_ice = params
            self._answer = _restarted_answer(self._answer, self.connection.local_username, password)
            return self._answer

    def _dtls_state(self) -> None:
        if self.dtls is not None and self.dtls.state == "connected":
            self._on_connected()

    def _pc_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed") and not self._closed:
            self._closed = True
            self._on_closed()

    def muxed_protocol(self) -> MuxedStunProtocol | None:
        """The mux protocol of the nominated ICE pair, or ``None`` (a relayed pair)."""
        if self.connection is None:
            return None
        pair = internals.nominated_pair(self.connection)
        if pair is not None and isinstance(pair.protocol, MuxedStunProtocol):
            return pair.protocol
        return None

    async def add_ice_candidate(
        self, candidate: str, sdp_mid: str | None, sdp_mline_index: int | None
    ) -> None:
        """Add one of the app's trickled candidates, or end-of-candidates (empty).

        :raises InvalidArgument: (``INVALID_CANDIDATE``) when it does not parse.
        """
        if not candidate:
            await self.pc.addIceCandidate(None)
            return
        try:
            parsed = candidate_from_sdp(candidate.removeprefix("candidate:"))
        except (ValueError, IndexError) as exc:
            raise InvalidArgument(
                f"the candidate does not parse: {exc}", reason="INVALID_CANDIDATE"
            ) from exc
        parsed.sdpMid = sdp_mid
        parsed.sdpMLineIndex = sdp_mline_index
        try:
            await self.pc.addIceCandidate(parsed)
        except ValueError as exc:
            raise InvalidArgument(str(exc), reason="INVALID_CANDIDATE") from exc

    async def close(self) -> None:
        """Close the peer connection (idempotent)."""
        try:
            await asyncio.wait_for(self.pc.close(), timeout=5)
        except (TimeoutError, ConnectionError) as exc:
            logger.info("closing a peer connection: %s", exc)
