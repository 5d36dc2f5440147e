"""Slot selection and the per-slot rewrite: continuous streams across speaker changes."""

from __future__ import annotations

import random

from aiortc.rtp import RtpPacket
from hypothesis import given, settings
from hypothesis import strategies as st

from services.media.forwarding import FRAME_TICKS, ForwardingGroup

SSRCS = (1111, 2222, 3333)


def group(excluded: str | None = None) -> ForwardingGroup:
    return ForwardingGroup(1, 111, SSRCS, excluded=excluded, rng=random.Random(7))


def test_the_loudest_take_free_lanes_in_order() -> None:
    g = group()
    changes = g.assign([("a", 90.0), ("b", 80.0)], margin=3)
    assert g.speakers() == ["a", "b", None]
    assert [(lane.index, old, new) for lane, old, new in changes] == [
        (0, None, "a"),
        (1, None, "b"),
    ]
    assert g.lane_of("a") is g.lanes[0] and g.lane_of("c") is None


def test_only_the_n_loudest_are_forwarded_and_the_excluded_never() -> None:
    ranked = [("a", 100.0), ("b", 90.0), ("c", 80.0), ("d", 70.0), ("e", 60.0)]
    g = group()
    g.assign(ranked, margin=3)
    assert set(g.speakers()) == {"a", "b", "c"}
    own = group(excluded="a")
    own.assign(ranked, margin=3)
    assert set(own.speakers()) == {"b", "c", "d"}


def test_hysteresis_keeps_a_lane_until_the_newcomer_is_clearly_louder() -> None:
    g = group()
    g.assign([("a", 100.0), ("b", 90.0), ("c", 80.0), ("d", 70.0)], margin=3)
    assert set(g.speakers()) == {"a", "b", "c"}
    # d is now barely louder than c: no switch.
    assert not g.assign([("a", 100.0), ("b", 90.0), ("d", 81.0), ("c", 80.0)], margin=3)
    assert set(g.speakers()) == {"a", "b", "c"}
    # d clearly louder: it takes c's lane, the others stay where they are.
    lane_c = g.lane_of("c")
    changes = g.assign([("a", 100.0), ("b", 90.0), ("d", 85.0), ("c", 80.0)], margin=3)
    assert [(old, new) for _, old, new in changes] == [("c", "d")]
    assert g.lane_of("d") is lane_c


def test_ineligible_speakers_lose_their_lane_at_once() -> None:
    g = group()
    g.assign([("a", 100.0), ("b", 90.0)], margin=3)
    changes = g.assign([("b", 90.0)], margin=3)  # a muted, or may no longer publish
    assert g.speakers() == [None, "b", None]
    assert [(old, new) for _, old, new in changes] == [("a", None)]


def decode(data: bytes) -> RtpPacket:
    return RtpPacket.parse(data)


def test_the_stream_stays_continuous_across_a_speaker_change() -> None:
    g = group()
    g.assign([("a", 100.0)], margin=3)
    lane = g.lanes[0]
    out = []
    for i in range(5):
        data = g.rewrite(lane, 0, 0xA, 500 + i, 10_000 + 960 * i, b"a%d" % i, now=1.0 + 0.02 * i)
        assert data is not None
        out.append(decode(data))
    g.assign([("b", 100.0)], margin=3)  # a left, b takes the free lane 0
    assert g.lanes[0].speaker == "b"
    for i in range(3):
        data = g.rewrite(lane, 0, 0xB, 60_000 + i, 7 + 960 * i, b"b%d" % i, now=1.5 + 0.02 * i)
        assert data is not None
        out.append(decode(data))
    seqs = [p.sequence_number for p in out]
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))
    assert {p.ssrc for p in out} == {SSRCS[0]}
    assert {p.payload_type for p in out} == {111}
    assert [p.payload for p in out] == [b"a0", b"a1", b"a2", b"a3", b"a4", b"b0", b"b1", b"b2"]
    # The timestamp goes on by the wall-clock gap (0.42 s) at the switch, 960 after.
    gap = (out[5].timestamp - out[4].timestamp) & 0xFFFFFFFF
    assert abs(gap - int(0.42 * 48000)) <= 1
    assert (out[6].timestamp - out[5].timestamp) & 0xFFFFFFFF == FRAME_TICKS
    assert out[5].marker == 1 and out[0].marker == 1 and out[6].marker == 0


def test_packets_from_before_a_switch_are_dropped_and_reordering_is_kept() -> None:
    g = group()
    g.assign([("a", 100.0)], margin=3)
    lane = g.lanes[0]
    first = g.rewrite(lane, 0, 9, 100, 0, b"x", now=0.0)
    assert first is not None
    assert g.rewrite(lane, 0, 9, 99, 0, b"x", now=0.01) is None, "older than the switch"
    late = g.rewrite(lane, 0, 9, 102, 1920, b"z", now=0.02)
    reordered = g.rewrite(lane, 0, 9, 101, 960, b"y", now=0.03)
    assert late is not None and reordered is not None
    assert decode(reordered).sequence_number == (decode(first).sequence_number + 1) & 0xFFFF
    assert lane.last_seq == decode(late).sequence_number, "the newest packet defines the end"


def test_a_new_ssrc_from_the_same_speaker_restarts_the_offsets() -> None:
    g = group()
    g.assign([("a", 100.0)], margin=3)
    lane = g.lanes[0]
    one = decode(g.rewrite(lane, 0, 1, 10, 0, b"x", now=0.0) or b"")
    two = decode(g.rewrite(lane, 0, 2, 40_000, 5, b"y", now=0.02) or b"")
    assert (two.sequence_number - one.sequence_number) & 0xFFFF == 1
    assert two.marker == 1


def test_a_clone_continues_the_lanes_and_drops_its_own_speaker() -> None:
    g = group()
    g.assign([("a", 100.0), ("b", 90.0)], margin=3)
    last = decode(g.rewrite(g.lanes[1], 0, 5, 1, 0, b"x", now=0.0) or b"")
    private = g.clone(2, excluded="a")
    assert private.speakers() == [None, "b", None]
    nxt = decode(private.rewrite(private.lanes[1], 0, 5, 2, 960, b"y", now=0.02) or b"")
    assert nxt.sequence_number == (last.sequence_number + 1) & 0xFFFF
    assert nxt.timestamp == (last.timestamp + 960) & 0xFFFFFFFF
    assert g.lanes[1].last_seq == last.sequence_number, "the original group is untouched"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 30)),
        min_size=1,
        max_size=12,
    ),
    st.integers(0, 0xFFFF),
)
def test_any_sequence_of_speakers_yields_one_continuous_stream(
    turns: list[tuple[str, int]], start: int
) -> None:
    g = ForwardingGroup(1, 111, (42,), rng=random.Random(start))
    lane = g.lanes[0]
    next_seq = {"a": start, "b": (start * 7) & 0xFFFF, "c": 0xFFF0}
    next_ts = {"a": 0, "b": 12345, "c": 0xFFFFFF00}
    now = 0.0
    seqs: list[int] = []
    timestamps: list[int] = []
    for speaker, count in turns:
        g.assign([(speaker, 100.0)], margin=3)
        for _ in range(count):
            seq = next_seq[speaker]
            next_seq[speaker] = (seq + 1) & 0xFFFF
            ts = next_ts[speaker]
            next_ts[speaker] = (ts + 960) & 0xFFFFFFFF
            data = g.rewrite(lane, 0, ord(speaker), seq, ts, b"p", now)
            now += 0.02
            assert data is not None
            packet = decode(data)
            seqs.append(packet.sequence_number)
            timestamps.append(packet.timestamp)
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))
    assert all(
        FRAME_TICKS <= (b - a) & 0xFFFFFFFF < 48000
        for a, b in zip(timestamps, timestamps[1:], strict=False)
    )
