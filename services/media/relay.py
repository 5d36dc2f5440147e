"""Relays: an edge node pulls a Space's speakers from the Space's origin node.

When a Space's origin is full, placement sends new listeners to edge nodes. An edge keeps
one :class:`RelayClient` per Space: a WebRTC peer connection to the origin (the edge is the
offerer, with one ``recvonly`` audio m-line per listening slot) that the origin serves like
one more listener (``OpenRelay``), so it carries the origin's N loudest speakers, already
chosen, with continuous SSRC, sequence numbers and timestamps per slot. The edge takes the
relay's RTP before aiortc's receivers (as it does from apps) and feeds each stream to its
room as a publisher; its own listeners then get those streams through the same fast path.
Forwarding stays decode-free end to end, and the origin serves one relay per edge whatever
the edge's listener count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from services.media import aiortc_internals as internals
from services.media.room import Room

logger = logging.getLogger(__name__)

__all__ = ["OpenRelay", "RelayClient"]

OpenRelay = Callable[[str], Awaitable[tuple[str, str]]]
"""Sends the edge's SDP offer to the origin; returns ``(relay id, SDP answer)``."""


class RelayClient:
    """An edge node's relay of one Space.

    :param room: the edge's room of the Space (the feeds go there).
    :param slot_count: streams to pull (the listeners' slot count).
    :param on_closed: called once when the relay's connection fails or closes.
    """

    def __init__(self, room: Room, slot_count: int, on_closed: Callable[[], None]) -> None:
        self.room = room
        self.slot_count = slot_count
        self.relay_id = ""
        self.origin = ""
        self._on_closed = on_closed
        # No STUN server: nodes reach each other directly (aiortc would ask Google's).
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._feeds: dict[int, str] = {}
        self._closed = False
        self.connected = asyncio.get_running_loop().create_future()

    @property
    def stream_count(self) -> int:
        """Streams that have delivered packets."""
        return len(self._feeds)

    async def open(self, origin: str, open_relay: OpenRelay) -> None:
        """Negotiate with the origin (through ``open_relay``) and start receiving.

        :param origin: the origin node's id (for logs and stats).
        """
        self.origin = origin
        transceivers = [
            self._pc.addTransceiver("audio", direction="recvonly") for _ in range(self.slot_count)
        ]
        for transceiver in transceivers:
            # No decoder threads or RTCP tasks: packets go to the room, undecoded.
            internals.neutralize(transceiver)
        await self._pc.setLocalDescription(await self._pc.createOffer())
        self._intercept()
        self.relay_id, answer = await open_relay(self._pc.localDescription.sdp)
        self._pc.on("connectionstatechange", self._state_changed)
        await self._pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        self._intercept()  # BUNDLE may have settled on another transport
        logger.info(
            "relay %s of space %s from %s negotiated", self.relay_id, self.room.space, origin
        )

    def _intercept(self) -> None:
        transports = {t.receiver.transport for t in self._pc.getTransceivers()}
        for dtls in transports:
            internals.intercept_srtp(dtls, self._on_rtp, _ignore)

    def _on_rtp(self, packet: bytes) -> None:
        if len(packet) < 12:
            return
        ssrc = int.from_bytes(packet[8:12], "big")
        feed = self._feeds.get(ssrc)
        if feed is None:
            if len(self._feeds) >= self.slot_count:
                return  # the origin sends one SSRC per slot; anything else is noise
            feed = self._feeds[ssrc] = f"relay-{ssrc:08x}"
            self.room.add_feed(feed, packet[1] & 0x7F)
            if not self.connected.done():
                self.connected.set_result(None)
        self.room.forward_feed(feed, packet, time.perf_counter())

    def _state_changed(self) -> None:
        if self._pc.connectionState in ("failed", "closed") and not self._closed:
            self._closed = True
            self.room.remove_feeds()
            self._on_closed()

    async def close(self) -> None:
        """Close the relay's connection and drop its feeds (idempotent)."""
        self._closed = True
        self.room.remove_feeds()
        try:
            await asyncio.wait_for(self._pc.close(), timeout=5)
        except (TimeoutError, ConnectionError) as error:
            logger.info("closing relay %s: %s", self.relay_id, error)


def _ignore(packet: bytes) -> None:
    """RTCP from the origin: the edge has no use for its sender reports."""
