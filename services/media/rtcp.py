"""RTCP of the engine: sender reports for the slots, receiver reports for publishers, and
what listeners' receiver reports say (loss, jitter, round-trip time).

aiortc's senders and receivers each run an RTCP task of their own; the engine replaces
them (see :func:`services.media.aiortc_internals.neutralize`) with one schedule for the
whole node that builds, per session, a single compound packet: one SR per slot that has
carried audio plus CNAMEs, and an RR for the publisher's stream. It is packed directly,
with the layout of aiortc's RTCP packet classes (the tests hold it to their bytes): at a
thousand listeners those classes were most of an idle node's remaining CPU. Sender
reports matter beyond statistics: their NTP time is what a listener's RR echoes
(LSR/DLSR) and what the round-trip time is computed from.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable

from aiortc import clock
from aiortc.rtp import RtcpPacket, RtcpReceiverInfo, RtcpRrPacket, RtcpSrPacket

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
_SR = 200
_RR = 201
_SDES = 202
_SENDER_REPORT = struct.Struct("!BBHLQLLL")  # header, SSRC, sender info (RFC 3550 6.4.1)
_RECEIVER_REPORT = struct.Struct("!BBHL")  # header, SSRC (6.4.2)
_REPORT_BLOCK = struct.Struct("!LLLLLL")
_SDES_CHUNK = struct.Struct("!BBHLBB")  # header, SSRC, CNAME item type and length (6.5)


def _report_block(info: RtcpReceiverInfo) -> bytes:
    lost = info.packets_lost & 0xFFFFFF  # 24-bit two's complement
    return _REPORT_BLOCK.pack(
        info.ssrc,
        info.fraction_lost << 24 | lost,
        info.highest_sequence,
        info.jitter,
        info.lsr,
        info.dlsr,
    )


def _sdes(ssrc: int, cname: bytes) -> bytes:
    """An SDES packet with one chunk: the CNAME, a null item and padding."""
    size = 4 + 2 + len(cname) + 2
    padding = b"\0" * (2 + -size % 4)
    words = (size + len(padding) - 2) // 4
    return _SDES_CHUNK.pack(0x81, _SDES, words, ssrc, _CNAME, len(cname)) + cname + padding


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
    packets: list[bytes] = []
    ssrcs: list[int] = []
    block = _report_block(received.report(now)) if received is not None else b""
    for lane in lanes:
        if not lane.packets or lane.last_time is None:
            continue
        elapsed = max(0.0, now - lane.last_time)
        rtp_now = (lane.last_ts + int(elapsed * OPUS_CLOCK)) & 0xFFFFFFFF
        count = 1 if block else 0
        header = _SENDER_REPORT.pack(
            0x80 | count,
            _SR,
            6 + 6 * count,
            lane.ssrc,
            ntp,
            rtp_now,
            lane.packets & 0xFFFFFFFF,
            lane.octets & 0xFFFFFFFF,
        )
        packets.append(header + block)
        ssrcs.append(lane.ssrc)
        block = b""
    if block:
        packets.insert(0, _RECEIVER_REPORT.pack(0x81, _RR, 7, receiver_ssrc) + block)
        ssrcs.append(receiver_ssrc)
    if not packets:
        return None
    encoded = cname.encode("utf8")
    packets.extend(_sdes(ssrc, encoded) for ssrc in ssrcs)
    return b"".join(packets)


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
