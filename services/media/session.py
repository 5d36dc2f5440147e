"""One participant's media session: its peer connection, permissions gate and egress.

A session is created by :meth:`MediaEngine.negotiate` and joins its room's forwarding
once DTLS is up. Every packet it publishes passes the permissions gate first: a
participant who may not publish (or is muted) has its RTP dropped and counted before it is
even decrypted. Its listening slots are served by the egress workers (fast path, on the
ICE mux) or by aiortc's own send path (:class:`FallbackSender`, a relayed pair).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from typing import TYPE_CHECKING

import pylibsrtp

from services.media import aiortc_internals as internals
from services.media.egress import EgressHandle, FallbackSender
from services.media.forwarding import ForwardingGroup
from services.media.ingress import Publisher
from services.media.metrics import (
    BYTES_RECEIVED,
    PACKETS_DROPPED,
    PACKETS_RECEIVED,
    DropReason,
)
from services.media.peer import Layout, Peer
from services.media.rtp import is_rtcp
from services.media.srtp_native import GcmSender

if TYPE_CHECKING:
    from aiortc import RTCDtlsTransport

    from services.media.room import Room

logger = logging.getLogger(__name__)

__all__ = ["Permissions", "Session", "SessionState"]


@dataclasses.dataclass
class Permissions:
    """What a participant may do, as rooms last said (kept for the life of the Space).

    :param may_publish: whether their packets are forwarded at all.
    :param muted: whether the host muted them (packets dropped while set).
    :param removed: whether they were removed from the Space (no new session).
    :param revision: the revision of the last applied update (-1: from a grant).
    """

    may_publish: bool
    muted: bool = False
    removed: bool = False
    revision: int = -1

    @property
    def forwards(self) -> bool:
        """Whether a packet from this participant may be forwarded now."""
        return self.may_publish and not self.muted and not self.removed


class SessionState(enum.Enum):
    """Lifecycle of a session."""

    NEW = "new"
    CONNECTED = "connected"
    CLOSED = "closed"


class Session:
    """A participant's peer connection in a room.

    :param session_id: the session's id (unique on the node).
    :param room: the room (Space) it belongs to.
    :param participant: the participant's id.
    :param layout: how its m-lines are used.
    :param permissions: the participant's permissions (shared with the room, updated in
        place).
    """

    def __init__(
        self,
        session_id: str,
        room: Room,
        participant: str,
        layout: Layout,
        permissions: Permissions,
    ) -> None:
        self.id = session_id
        self.room = room
        self.participant = participant
        self.layout = layout
        self.permissions = permissions
        self.state = SessionState.NEW
        self.peer = Peer(
            room.config,
            room.mux,
            layout,
            room.slot_ssrcs,
            on_rtp=self.on_rtp,
            on_rtcp=self.on_rtcp,
            on_connected=self._connected,
            on_closed=self._closed,
        )
        self.publisher: Publisher | None = None
        if layout.publish is not None and layout.publish.opus_pt is not None:
            self.publisher = Publisher(
                participant,
                layout.publish.opus_pt,
                layout.publish.audio_level_id,
                time.perf_counter(),
            )
        self.egress: EgressHandle | None = None
        self.fallback: FallbackSender | None = None
        self.group: ForwardingGroup | None = None
        self.next_rtcp = 0.0
        self._rx: pylibsrtp.Session | None = None
        self.connected = room.loop.create_future()

    @property
    def slot_ssrcs(self) -> frozenset[int]:
        """The SSRCs of the slots this session receives."""
        return frozenset(self.room.slot_ssrcs[: len(self.layout.slots)])

    @property
    def role(self) -> str:
        """``publisher`` when the participant may publish now, else ``listener``."""
        return "publisher" if self.permissions.may_publish else "listener"

    # -- lifecycle -------------------------------------------------------------------

    def _connected(self) -> None:
        dtls = self.peer.dtls
        if self.state is not SessionState.NEW or dtls is None:
            return
        rx, tx = internals.srtp_sessions(dtls)
        if rx is None or tx is None:
            return
        self._rx = rx
        protocol = self.peer.muxed_protocol()
        if protocol is not None:
            pair = internals.nominated_pair(protocol.receiver)
            assert pair is not None
            self.egress = EgressHandle(
                self.id, tx, protocol.mux.fd, pair.remote_addr, gcm=self._gcm_sender(dtls)
            )
            protocol.srtp_handler = self.on_srtp
            protocol.on_moved = self._moved
        else:
            logger.info("session %s: relayed ICE pair, using aiortc's send path", self.id)
            self.fallback = FallbackSender(lambda data: internals.send_rtp(dtls, data))
        self.state = SessionState.CONNECTED
        self.room.attach(self)
        if not self.connected.done():
            self.connected.set_result(None)

    def _gcm_sender(self, dtls: RTCDtlsTransport) -> GcmSender | None:
        """The fast path's own AES-GCM sender for this session's RTP, when configured and
        the negotiated profile and the CPU allow it (else libsrtp protects)."""
        if not self.room.config.native_srtp:
            return None
        keying = internals.srtp_tx_keying(dtls)
        if keying is None:
            return None
        return GcmSender.for_profile(*keying)

    def _moved(self, address: tuple[str, int]) -> None:
        """The app's nominated ICE pair moved (ICE restart, NAT rebinding): forward to
        its new address. DTLS, SRTP and RTCP from aiortc follow aioice's nominated pair
        by themselves; the egress workers keep their own copy of the address."""
        egress = self.egress
        if egress is None or self.state is not SessionState.CONNECTED:
            return
        logger.info("session %s: forwarding to %s from now on", self.id, address)
        group = self.group
        self.room.pool.readdress(egress, address, group.group_id if group else None)

    def _closed(self) -> None:
        self.room.loop.create_task(self.room.close_session(self, reason="peer connection ended"))

    def mark_closed(self) -> None:
        """Stop taking packets (the room has detached the session)."""
        self.state = SessionState.CLOSED
        protocol = self.peer.muxed_protocol()
        if protocol is not None:
            protocol.srtp_handler = None
            protocol.on_moved = None
        if not self.connected.done():
            self.connected.set_exception(ConnectionError("the session closed"))
            self.connected.exception()  # retrieved: nobody may be waiting

    # -- packets from the app ----------------------------------------------------------

    def on_srtp(self, data: bytes, received: float) -> None:
        """An SRTP or SRTCP datagram from the mux (the fast path)."""
        rx = self._rx
        if rx is None:
            return
        if is_rtcp(data):
            try:
                plain = rx.unprotect_rtcp(data)
            except pylibsrtp.Error:
                PACKETS_DROPPED.labels(DropReason.SRTP).inc()
                return
            self.on_rtcp(plain)
            return
        PACKETS_RECEIVED.inc()
        BYTES_RECEIVED.inc(len(data))
        if not self._may_forward():
            return
        try:
            plain = rx.unprotect(data)
        except pylibsrtp.Error:
            PACKETS_DROPPED.labels(DropReason.SRTP).inc()
            return
        self.room.forward(self, plain, received)

    def on_rtp(self, plain: bytes) -> None:
        """An unprotected RTP packet from aiortc's DTLS transport (the slow path)."""
        PACKETS_RECEIVED.inc()
        BYTES_RECEIVED.inc(len(plain))
        if self.state is SessionState.CONNECTED and self._may_forward():
            self.room.forward(self, plain, time.perf_counter())

    def on_rtcp(self, plain: bytes) -> None:
        """An unprotected RTCP compound packet from the app."""
        if self.state is SessionState.CONNECTED:
            self.room.read_rtcp(self, plain)

    def _may_forward(self) -> bool:
        if self.publisher is None:
            PACKETS_DROPPED.labels(DropReason.NO_PUBLISH_LINE).inc()
            return False
        permissions = self.permissions
        if not permissions.may_publish or permissions.removed:
            PACKETS_DROPPED.labels(DropReason.NOT_PERMITTED).inc()
            return False
        if permissions.muted:
            PACKETS_DROPPED.labels(DropReason.MUTED).inc()
            return False
        return True
