"""Slot selection and the per-slot RTP rewrite.

A *forwarding group* is a set of listeners that hear exactly the same thing: the N
loudest eligible publishers, each in one of N *slot lanes*. Every listener of a group gets
the same rewritten plaintext packet, so the rewrite (and the slot bookkeeping) happens once
per packet and group, and only SRTP protection and the send happen per listener.

Each lane has its own SSRC (the one the listener's answer declared for that m-line), and
its own output sequence number and timestamp spaces. When the speaker in a lane changes,
the offsets are recomputed so the browser sees one continuous stream: the sequence number
goes on by one and the timestamp by the wall-clock gap (at least one 20 ms frame), and
the packet carries the marker bit (a new talkspurt, RFC 3551).

The room keeps one group per Opus payload type for pure listeners, and one private group
per publisher, which leaves the publisher out of its own lanes: nobody hears their own
voice, and a publisher's lanes hold the N loudest *other* publishers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from services.media.rtp import RTP_HEADER

logger = logging.getLogger(__name__)

__all__ = ["ForwardingGroup", "SlotLane", "SlotChange"]

OPUS_CLOCK = 48000
FRAME_TICKS = 960
"""One 20 ms Opus frame in 48 kHz timestamp units."""
_REORDER_WINDOW = 128


class SlotLane:
    """One listening slot of a group: its SSRC, its speaker and its rewrite state.

    :param index: the slot's position (0 .. N-1).
    :param ssrc: the SSRC listeners know this slot by.
    :param rng: random source for the initial sequence number and timestamp.
    """

    __slots__ = (
        "floor",
        "in_ssrc",
        "index",
        "last_seq",
        "last_time",
        "last_ts",
        "max_seq",
        "octets",
        "packets",
        "resync",
        "seq_offset",
        "speaker",
        "ssrc",
        "ts_offset",
    )

    def __init__(self, index: int, ssrc: int, rng: random.Random) -> None:
        self.index = index
        self.ssrc = ssrc
        self.speaker: str | None = None
        self.in_ssrc = -1
        self.seq_offset = 0
        self.ts_offset = 0
        self.floor = 0
        self.max_seq = 0
        # Start in the lower half of the sequence space, as browsers do, so the first
        # wrap-around (and its SRTP rollover) is far away.
        self.last_seq = rng.randrange(0x8000)
        self.last_ts = rng.randrange(1 << 32)
        self.last_time: float | None = None
        self.resync = True
        self.packets = 0
        self.octets = 0

    def copy(self) -> SlotLane:
        """An independent lane in the same state (for a cloned group)."""
        lane = SlotLane.__new__(SlotLane)
        for name in SlotLane.__slots__:
            setattr(lane, name, getattr(self, name))
        return lane


SlotChange = tuple[SlotLane, str | None, str | None]
"""A lane whose speaker changed: ``(lane, previous speaker, new speaker)``."""


class ForwardingGroup:
    """Listeners that receive the same rewritten packets.

    :param group_id: a number unique within the engine (egress plans are keyed by it).
    :param payload_type: the Opus payload type the group's listeners negotiated.
    :param ssrcs: one SSRC per slot lane.
    :param excluded: a participant never forwarded to this group (its own publisher).
    """

    def __init__(
        self,
        group_id: int,
        payload_type: int,
        ssrcs: Sequence[int],
        excluded: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        rng = rng or random.Random()
        self.group_id = group_id
        self.payload_type = payload_type
        self.excluded = excluded
        self.lanes = [SlotLane(i, ssrc, rng) for i, ssrc in enumerate(ssrcs)]
        self._by_speaker: dict[str, SlotLane] = {}

    def clone(self, group_id: int, excluded: str | None) -> ForwardingGroup:
        """A new group continuing this one's lanes (same speakers, sequence numbers and
        timestamps), so a listener moved into it hears no discontinuity."""
        group = ForwardingGroup.__new__(ForwardingGroup)
        group.group_id = group_id
        group.payload_type = self.payload_type
        group.excluded = excluded
        group.lanes = [lane.copy() for lane in self.lanes]
        group._by_speaker = {}
        for lane in group.lanes:
            if lane.speaker is not None:
                if lane.speaker == excluded:
                    lane.speaker = None
                    lane.resync = True
                else:
                    group._by_speaker[lane.speaker] = lane
        return group

    def lane_of(self, speaker: str) -> SlotLane | None:
        """The lane ``speaker`` holds, if any."""
        return self._by_speaker.get(speaker)

    def speakers(self) -> list[str | None]:
        """The speaker of each lane (``None`` for a free lane)."""
        return [lane.speaker for lane in self.lanes]

    def _set(self, lane: SlotLane, speaker: str | None, changes: list[SlotChange]) -> None:
        previous = lane.speaker
        if previous is not None:
            del self._by_speaker[previous]
        lane.speaker = speaker
        lane.resync = True
        if speaker is not None:
            self._by_speaker[speaker] = lane
        changes.append((lane, previous, speaker))

    def assign(self, ranked: Sequence[tuple[str, float]], margin: float) -> list[SlotChange]:
        """Bring the lanes in line with a ranking of eligible publishers.

        :param ranked: ``(participant, loudness)`` of every eligible publisher, loudest
            first. Publishers missing from it (muted, not allowed to publish, gone) lose
            their lane at once.
        :param margin: hysteresis: a newcomer among the N loudest displaces the quietest
            lane holder outside them only when louder by this many dB, so two publishers
            of similar level do not make the slot flap.
        :returns: the lanes whose speaker changed.
        """
        changes: list[SlotChange] = []
        loudness = {p: level for p, level in ranked if p != self.excluded}
        for lane in self.lanes:
            if lane.speaker is not None and lane.speaker not in loudness:
                self._set(lane, None, changes)
        top = [p for p, _ in ranked if p != self.excluded][: len(self.lanes)]
        top_set = set(top)
        for speaker in top:
            if speaker in self._by_speaker:
                continue
            free = next((lane for lane in self.lanes if lane.speaker is None), None)
            if free is not None:
                self._set(free, speaker, changes)
                continue
            victim = min(
                (lane for lane in self.lanes if lane.speaker not in top_set),
                key=lambda lane: loudness[lane.speaker or ""],
            )
            if loudness[speaker] >= loudness[victim.speaker or ""] + margin:
                self._set(victim, speaker, changes)
        return changes

    def rewrite(
        self,
        lane: SlotLane,
        marker: int,
        ssrc: int,
        seq: int,
        timestamp: int,
        payload: bytes,
        now: float,
    ) -> bytes | None:
        """The packet listeners of this group get for one publisher packet in ``lane``.

        :param marker: the publisher's marker bit (kept, and forced on a speaker change).
        :param ssrc: the publisher's SSRC (a new one restarts the lane's offsets).
        :param seq: the publisher's sequence number.
        :param timestamp: the publisher's RTP timestamp.
        :param payload: the Opus payload (no header, extensions or padding).
        :param now: arrival time (``time.monotonic()``).
        :returns: the rewritten plaintext packet, or ``None`` for a packet older than the
            lane's last speaker change (or reordered by more than 128 packets).
        """
        if lane.resync or ssrc != lane.in_ssrc:
            lane.seq_offset = (lane.last_seq + 1 - seq) & 0xFFFF
            gap = FRAME_TICKS
            if lane.last_time is not None:
                gap = max(FRAME_TICKS, int((now - lane.last_time) * OPUS_CLOCK))
            lane.ts_offset = (lane.last_ts + gap - timestamp) & 0xFFFFFFFF
            lane.floor = seq
            lane.max_seq = seq
            lane.in_ssrc = ssrc
            lane.resync = False
            marker = 1
        elif ((seq - lane.floor) & 0xFFFF) >= 0x8000:
            return None
        out_seq = (seq + lane.seq_offset) & 0xFFFF
        out_ts = (timestamp + lane.ts_offset) & 0xFFFFFFFF
        if ((seq - lane.max_seq) & 0xFFFF) < 0x8000:
            lane.max_seq = seq
            lane.last_seq = out_seq
            lane.last_ts = out_ts
            lane.last_time = now
            if ((seq - lane.floor) & 0xFFFF) > 2 * _REORDER_WINDOW:
                lane.floor = (seq - _REORDER_WINDOW) & 0xFFFF
        lane.packets += 1
        lane.octets += len(payload)
        return (
            RTP_HEADER.pack(0x80, (marker << 7) | self.payload_type, out_seq, out_ts, lane.ssrc)
            + payload
        )
