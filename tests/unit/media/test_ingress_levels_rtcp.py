"""A publisher's packets (levels, statistics) and media's RTCP (reports out, feedback in)."""

from __future__ import annotations

import random

import pytest
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
from prometheus_client import REGISTRY

from services.media.forwarding import ForwardingGroup, SlotLane
from services.media.ingress import Publisher, ReceiveStatistics
from services.media.levels import LevelMeter
from services.media.rtcp import compound_report, ntp_middle, read_reports
from services.media.rtp import build_header


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": reason}) or 0


def test_the_level_meter_smooths_towards_the_packet_levels() -> None:
    meter = LevelMeter()
    for i in range(60):
        meter.add(20, now=i * 0.02)  # -20 dBov
    assert abs(meter.dbov + 20) < 0.1
    level = meter.snapshot("alice", forwarded=True)
    assert level.participant == "alice" and level.speaking and level.forwarded
    assert abs(level.level - 0.1) < 0.01 and level.dbov == -20.0
    assert meter.active(1.5, timeout=1.0) and not meter.active(3.0, timeout=1.0)
    for i in range(60):
        meter.add(127, now=2 + i * 0.02)
    assert not meter.snapshot("alice", forwarded=False).speaking
    assert LevelMeter().snapshot("x", False).level == 0.0


def test_receive_statistics_count_loss_and_wrap_around() -> None:
    stats = ReceiveStatistics(ssrc=5, seq=65530)
    seqs = [65530, 65531, 65533, 65534, 65535, 0, 1, 3]  # 65532 and 2 lost
    for i, seq in enumerate(seqs):
        stats.update(seq, 960 * i, arrival=i * 0.02)
    report = stats.report(now=1.0)
    assert report.ssrc == 5
    assert report.highest_sequence == (1 << 16) + 3
    assert report.packets_lost == 2
    assert report.fraction_lost == (2 << 8) // 10
    assert report.jitter < 5, "regular arrivals: next to no jitter"
    assert stats.report(now=2.0).fraction_lost == 0, "nothing new lost since"


def test_jitter_grows_with_irregular_arrivals() -> None:
    stats = ReceiveStatistics(ssrc=1, seq=0)
    rng = random.Random(3)
    for i in range(200):
        stats.update(i, 960 * i, arrival=i * 0.02 + rng.uniform(0, 0.01))
    assert 50 < stats.report(now=5.0).jitter < 480


def test_a_publisher_ingests_opus_and_drops_the_rest() -> None:
    publisher = Publisher("alice", payload_type=111, level_id=None, now=0.0)
    packet = build_header(1, 111, 7, 960, 0xAA) + b"frame"
    assert publisher.ingest(packet, now=1.0) == (1, 0xAA, 7, 960, b"frame")
    assert publisher.stats is not None and publisher.stats.received == 1
    codec, malformed = dropped("codec"), dropped("malformed")
    assert publisher.ingest(build_header(0, 0, 8, 0, 0xAA) + b"pcmu", now=1.0) is None
    assert publisher.ingest(b"\x80", now=1.0) is None
    assert dropped("codec") == codec + 1 and dropped("malformed") == malformed + 1
    publisher.ingest(build_header(0, 111, 1, 0, 0xBB) + b"x", now=1.1)
    assert publisher.stats.ssrc == 0xBB, "a new SSRC starts new statistics"


def test_the_compound_report_has_an_sr_per_active_slot_and_the_publisher_rr() -> None:
    g = ForwardingGroup(1, 111, (10, 20, 30), rng=random.Random(1))
    g.assign([("a", 90.0)], margin=3)
    g.rewrite(g.lanes[0], 0, 1, 1, 0, b"12345", now=100.0)
    stats = ReceiveStatistics(ssrc=77, seq=1)
    stats.update(1, 0, arrival=100.0)
    data = compound_report(g.lanes, "cname-x", 99, stats, now=100.5)
    assert data is not None
    packets = RtcpPacket.parse(data)
    sr = packets[0]
    assert isinstance(sr, RtcpSrPacket) and sr.ssrc == 10
    assert sr.sender_info.packet_count == 1 and sr.sender_info.octet_count == 5
    rtp_gap = (sr.sender_info.rtp_timestamp - g.lanes[0].last_ts) & 0xFFFFFFFF
    assert rtp_gap == 24000, "the RTP clock is extrapolated to now"
    assert [r.ssrc for r in sr.reports] == [77]
    assert isinstance(packets[-1], RtcpSdesPacket)
    assert packets[-1].chunks[0].items == [(1, b"cname-x")]
    # Receive-only, nothing forwarded yet: an RR only.
    only_rr = RtcpPacket.parse(compound_report([], "c", 99, stats, now=101.0) or b"")
    assert isinstance(only_rr[0], RtcpRrPacket) and only_rr[0].ssrc == 99
    assert compound_report(g.lanes[1:], "c", 99, None, now=101.0) is None


def reference_report(
    lanes: list[SlotLane],
    cname: str,
    receiver_ssrc: int,
    block: RtcpReceiverInfo | None,
    now: float,
) -> bytes | None:
    """The compound report built with aiortc's RTCP packet classes (what the engine sent
    before it packed reports itself)."""
    ntp = clock.current_ntp_time()
    packets: list[RtcpSrPacket | RtcpRrPacket | RtcpSdesPacket] = []
    ssrcs: list[int] = []
    reports = [block] if block is not None else []
    for lane in lanes:
        if not lane.packets or lane.last_time is None:
            continue
        rtp_now = (lane.last_ts + int(max(0.0, now - lane.last_time) * 48000)) & 0xFFFFFFFF
        info = RtcpSenderInfo(
            ntp_timestamp=ntp,
            rtp_timestamp=rtp_now,
            packet_count=lane.packets & 0xFFFFFFFF,
            octet_count=lane.octets & 0xFFFFFFFF,
        )
        packets.append(RtcpSrPacket(ssrc=lane.ssrc, sender_info=info, reports=reports))
        ssrcs.append(lane.ssrc)
        reports = []
    if reports:
        packets.insert(0, RtcpRrPacket(ssrc=receiver_ssrc, reports=reports))
        ssrcs.append(receiver_ssrc)
    if not packets:
        return None
    for ssrc in ssrcs:
        chunk = RtcpSourceInfo(ssrc=ssrc, items=[(1, cname.encode())])
        packets.append(RtcpSdesPacket(chunks=[chunk]))
    return b"".join(bytes(packet) for packet in packets)


@pytest.mark.parametrize("cname_length", [0, 1, 2, 3, 4, 5, 16, 17, 255])
@pytest.mark.parametrize("active_lanes", [0, 1, 3])
@pytest.mark.parametrize("publishing", [False, True])
def test_the_packed_report_is_byte_for_byte_aiortcs(
    monkeypatch: pytest.MonkeyPatch, cname_length: int, active_lanes: int, publishing: bool
) -> None:
    frozen_ntp = clock.current_ntp_time()
    monkeypatch.setattr(clock, "current_ntp_time", lambda: frozen_ntp)
    rng = random.Random(cname_length * 10 + active_lanes)
    g = ForwardingGroup(1, 111, (10, 20, 0xFFFFFFFF), rng=rng)
    g.assign([(speaker, 90.0 - i) for i, speaker in enumerate("abc"[:active_lanes])], margin=3)
    for i, lane in enumerate(g.lanes[:active_lanes]):
        for n in range(rng.randrange(1, 40)):
            g.rewrite(lane, n, 1 + n, 960 * n, 0, b"x" * rng.randrange(1, 200), now=100.0 + i)
    cname = "".join(rng.choice("abcdef0123") for _ in range(cname_length))
    block = None
    if publishing:
        block = RtcpReceiverInfo(
            ssrc=0xDEADBEEF,
            fraction_lost=rng.randrange(256),
            packets_lost=rng.choice([0, 5, -3, 0x7FFFFF, -0x800000]),
            highest_sequence=rng.randrange(1 << 32),
            jitter=rng.randrange(1 << 32),
            lsr=rng.randrange(1 << 32),
            dlsr=rng.randrange(1 << 32),
        )

    class Fixed(ReceiveStatistics):
        def report(self, now: float) -> RtcpReceiverInfo:
            assert block is not None
            return block

    received = Fixed(ssrc=0xDEADBEEF, seq=0) if publishing else None
    ours = compound_report(g.lanes, cname, 99, received, now=107.25)
    assert ours == reference_report(g.lanes, cname, 99, block, now=107.25)
    assert (ours is None) == (active_lanes == 0 and not publishing)
    if ours is not None:
        parsed = RtcpPacket.parse(ours)  # and aiortc reads it back
        senders = [p for p in parsed if isinstance(p, RtcpSrPacket)]
        assert len(senders) == active_lanes


def test_listener_reports_feed_loss_jitter_and_round_trip_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Freeze the NTP clock: the round trip is computed from "now", and a loaded machine
    # must not move it.
    frozen_ntp = clock.current_ntp_time()
    monkeypatch.setattr(clock, "current_ntp_time", lambda: frozen_ntp)

    def count(name: str) -> float:
        return REGISTRY.get_sample_value(f"spaces_media_{name}_count") or 0

    def total(name: str) -> float:
        return REGISTRY.get_sample_value(f"spaces_media_{name}_sum") or 0

    sent_ntp = clock.current_ntp_time() - (1 << 32) // 10  # our SR left 100 ms ago
    report = RtcpReceiverInfo(
        ssrc=10,
        fraction_lost=64,
        packets_lost=3,
        highest_sequence=100,
        jitter=480,
        lsr=ntp_middle(sent_ntp),
        dlsr=65536 // 20,  # the listener held it 50 ms
    )
    other = RtcpReceiverInfo(
        ssrc=555, fraction_lost=0, packets_lost=0, highest_sequence=0, jitter=0, lsr=0, dlsr=0
    )
    names = ("round_trip_time_seconds", "receiver_loss_ratio", "receiver_jitter_seconds")
    before = {n: (count(n), total(n)) for n in names}
    publisher_stats = ReceiveStatistics(ssrc=77, seq=0)
    sr = RtcpSrPacket(
        ssrc=77,
        sender_info=RtcpSenderInfo(
            ntp_timestamp=sent_ntp, rtp_timestamp=0, packet_count=1, octet_count=1
        ),
    )
    data = bytes(RtcpRrPacket(ssrc=1, reports=[report, other])) + bytes(sr)
    read_reports(data, frozenset({10, 20}), publisher_stats, now=5.0)

    rtt = total("round_trip_time_seconds") - before["round_trip_time_seconds"][1]
    assert count("round_trip_time_seconds") == before["round_trip_time_seconds"][0] + 1
    assert abs(rtt - 0.05) < 0.001  # 100 ms since our SR, minus the 50 ms the listener held it
    loss = total("receiver_loss_ratio") - before["receiver_loss_ratio"][1]
    assert loss == 0.25
    jitter = total("receiver_jitter_seconds") - before["receiver_jitter_seconds"][1]
    assert abs(jitter - 0.01) < 1e-9
    assert publisher_stats.lsr == ntp_middle(sent_ntp) and publisher_stats.lsr_time == 5.0
    malformed = dropped("malformed")
    read_reports(b"\x80\xc9\x00", frozenset(), None, now=0.0)
    assert dropped("malformed") == malformed + 1
