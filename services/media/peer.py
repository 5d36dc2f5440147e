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
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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

from services.common.errors import InvalidArgument
from services.media import aiortc_internals as internals
from services.media.config import MediaConfig
from services.media.icemux import IceMux, MuxedStunProtocol
from services.media.sdp import AudioLine, Offer, restrict_to_opus, tune_answer

logger = logging.getLogger(__name__)

__all__ = ["Layout", "Peer"]


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
        return tune_answer(self.pc.localDescription.sdp)

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
