"""RTCP of the engine: sender reports for the slots, receiver reports for publishers, and
what listeners' receiver reports say (loss, jitter, round-trip time).

aiortc's senders and receivers each run an RTCP task of their own; the engine replaces
them (see :func:`services.media.aiortc_internals.neutralize`) with one schedule for the
whole node that builds, per session, a single compound packet with aiortc's RTCP packet
classes: one SR per slot that has carried audio plus CNAMEs, and an RR for the publisher's
stream. Sender reports matter beyond statistics: their NTP time is what a listener's RR
echoes (LSR/DLSR) and what the round-trip time is computed from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiortc import clock
from aiortc.rtp import (
    RtcpPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpSdesPacket,
    RtcpSenderInfo,
    RtcpSourceInfo,
    RtcpSrPacket,
)

from services.media.forwarding import OPUS_CLOCK, SlotLane
from services.media.ingress import ReceiveStatistics
from services.media.metrics import (
    PACKETS_DROPPED,
    RECEIVER_JITTER,
    RECEIVER_LOSS,
    ROUND_TRIP_TIME,
    DropReason,
)

logger = logging.getLogger(__name__)

__all__ = ["compound_report", "ntp_middle", "read_reports"]

_CNAME = 1


def ntp_middle(ntp: int) -> int:
    """The middle 32 bits of a 64-bit NTP timestamp (the LSR format)."""
    return (ntp >> 16) & 0xFFFFFFFF


def compound_report(
    lanes: Iterable[SlotLane],
    cname: str,
    receiver_ssrc: int,
    received: ReceiveStatistics | None,
    now: float,
) -> bytes | None:
    """One compound RTCP packet for a session, or ``None`` when there is nothing to say.

    :param lanes: the slot lanes the session receives (an SR for each that has sent).
    :param cname: the CNAME of media's streams in this session.
    :param receiver_ssrc: the SSRC media reports as when it only receives.
    :param received: statistics of the session's published stream, if any.
    :param now: ``time.perf_counter()``, the clock lanes were stamped with.
    """
    ntp = clock.current_ntp_time()
    packets: list[RtcpSrPacket | RtcpRrPacket | RtcpSdesPacket] = []
    ssrcs: list[int] = []
    block = [received.report(now)] if received is not None else []
    for lane in lanes:
        if not lane.packets or lane.last_time is None:
            continue
        elapsed = max(0.0, now - lane.last_time)
        rtp_now = (lane.last_ts + int(elapsed * OPUS_CLOCK)) & 0xFFFFFFFF
        info = RtcpSenderInfo(
            ntp_timestamp=ntp,
            rtp_timestamp=rtp_now,
            packet_count=lane.packets & 0xFFFFFFFF,
            octet_count=lane.octets & 0xFFFFFFFF,
        )
        packets.append(RtcpSrPacket(ssrc=lane.ssrc, sender_info=info, reports=block))
        ssrcs.append(lane.ssrc)
        block = []
    if block:
        packets.insert(0, RtcpRrPacket(ssrc=receiver_ssrc, reports=block))
        ssrcs.append(receiver_ssrc)
    if not packets:
        return None
    encoded = cname.encode("utf8")
    for ssrc in ssrcs:
        packets.append(
            RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=ssrc, items=[(_CNAME, encoded)])])
        )
    return b"".join(bytes(packet) for packet in packets)


def read_reports(
    data: bytes, slot_ssrcs: frozenset[int], received: ReceiveStatistics | None, now: float
) -> None:
    """Take what media needs from an (unprotected) RTCP compound packet from a session.

    Report blocks about a slot feed the receiver metrics; a sender report about the
    session's published stream is remembered for the next receiver report's LSR/DLSR.
    """
    try:
        packets = RtcpPacket.parse(data)
    except ValueError:
        PACKETS_DROPPED.labels(DropReason.MALFORMED).inc()
        return
    arrival = None
    for packet in packets:
        if isinstance(packet, RtcpSrPacket) and received is not None:
            if packet.ssrc == received.ssrc:
                received.lsr = ntp_middle(packet.sender_info.ntp_timestamp)
                received.lsr_time = now
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc in slot_ssrcs:
                    if arrival is None:
                        arrival = ntp_middle(clock.current_ntp_time())
                    _observe(report, arrival)


def _observe(report: RtcpReceiverInfo, arrival: int) -> None:
    RECEIVER_LOSS.observe(report.fraction_lost / 256.0)
    RECEIVER_JITTER.observe(report.jitter / OPUS_CLOCK)
    if report.lsr:
        rtt = ((arrival - report.lsr - report.dlsr) & 0xFFFFFFFF) / 65536.0
        if rtt < 60.0:
            ROUND_TRIP_TIME.observe(rtt)
