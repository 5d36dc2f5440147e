"""A publisher's incoming RTP: parsing, level metering and receive statistics.

Packets reach :meth:`Publisher.ingest` already SRTP-unprotected, either from the ICE mux
(the fast path) or from aiortc's DTLS transport (the slow path), and never from aiortc's
receiver: nothing is decoded. The permission check happens before (in the session), so a
packet from someone who may not publish costs no parsing at all.
"""

from __future__ import annotations

import logging

from aiortc.rtp import RtcpReceiverInfo

from services.media.forwarding import ForwardingGroup, SlotLane
from services.media.levels import LevelMeter
from services.media.metrics import PACKETS_DROPPED, DropReason
from services.media.rtp import parse_rtp

logger = logging.getLogger(__name__)

__all__ = ["Publisher", "ReceiveStatistics"]

_CLOCK = 48000


class ReceiveStatistics:
    """RFC 3550 reception statistics of one incoming stream (for receiver reports).

    :param ssrc: the publisher's SSRC.
    :param seq: the first packet's sequence number.
    """

    __slots__ = (
        "base_seq",
        "cycles",
        "expected_prior",
        "jitter",
        "lsr",
        "lsr_time",
        "max_seq",
        "received",
        "received_prior",
        "ssrc",
        "transit",
    )

    def __init__(self, ssrc: int, seq: int) -> None:
        self.ssrc = ssrc
        self.base_seq = seq
        self.max_seq = seq
        self.cycles = 0
        self.received = 0
        self.expected_prior = 0
        self.received_prior = 0
        self.jitter = 0.0
        self.transit: int | None = None
        self.lsr = 0
        self.lsr_time = 0.0

    def update(self, seq: int, timestamp: int, arrival: float) -> None:
        """Account one packet (RFC 3550 A.1 and A.8)."""
        self.received += 1
        delta = (seq - self.max_seq) & 0xFFFF
        if 0 < delta < 0x8000:
            if seq < self.max_seq:
                self.cycles += 1 << 16
            self.max_seq = seq
        transit = int(arrival * _CLOCK) - timestamp
        if self.transit is not None:
            d = abs(transit - self.transit)
            if d < _CLOCK * 10:  # ignore timestamp jumps (a new talkspurt after DTX)
                self.jitter += (d - self.jitter) / 16.0
        self.transit = transit

    def report(self, now: float) -> RtcpReceiverInfo:
        """A report block, and the start of the next reporting interval."""
        extended_max = self.cycles + self.max_seq
        expected = extended_max - self.base_seq + 1
        lost = max(0, expected - self.received)
        expected_interval = expected - self.expected_prior
        received_interval = self.received - self.received_prior
        self.expected_prior = expected
        self.received_prior = self.received
        lost_interval = expected_interval - received_interval
        fraction = 0
        if expected_interval > 0 and lost_interval > 0:
            fraction = min(255, (lost_interval << 8) // expected_interval)
        dlsr = 0
        if self.lsr:
            dlsr = int(max(0.0, now - self.lsr_time) * 65536) & 0xFFFFFFFF
        return RtcpReceiverInfo(
            ssrc=self.ssrc,
            fraction_lost=fraction,
            packets_lost=min(lost, 0x7FFFFF),
            highest_sequence=extended_max & 0xFFFFFFFF,
            jitter=int(self.jitter),
            lsr=self.lsr,
            dlsr=dlsr,
        )


class Publisher:
    """What media knows about a session's outgoing audio.

    :param participant: the participant's id (slot lanes are held by it).
    :param payload_type: the Opus payload type the session negotiated to publish with.
    :param level_id: the RFC 6464 extension id it negotiated, or ``None``.
    :param now: creation time (``time.perf_counter()``).
    """

    def __init__(
        self, participant: str, payload_type: int, level_id: int | None, now: float
    ) -> None:
        self.participant = participant
        self.payload_type = payload_type
        self.level_id = level_id
        self.meter = LevelMeter(now - 3600.0)
        self.stats: ReceiveStatistics | None = None
        self.targets: list[tuple[ForwardingGroup, SlotLane]] = []
        self.eligible = False

    def ingest(self, packet: bytes, now: float) -> tuple[int, int, int, int, bytes] | None:
        """Parse one unprotected packet and account it.

        :returns: ``(marker, ssrc, sequence, timestamp, payload)``, or ``None`` when the
            packet is dropped (malformed, or not Opus).
        """
        try:
            payload_type, marker, seq, timestamp, ssrc, start, end, level = parse_rtp(
                packet, self.level_id
            )
        except ValueError:
            PACKETS_DROPPED.labels(DropReason.MALFORMED).inc()
            return None
        if payload_type != self.payload_type:
            PACKETS_DROPPED.labels(DropReason.CODEC).inc()
            return None
        self.meter.add(level, now)
        stats = self.stats
        if stats is None or stats.ssrc != ssrc:
            stats = self.stats = ReceiveStatistics(ssrc, seq)
        stats.update(seq, timestamp, now)
        return marker, ssrc, seq, timestamp, packet[start:end]
