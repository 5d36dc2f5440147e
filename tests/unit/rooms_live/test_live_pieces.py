"""The pure parts of the live machinery: tokens, the event layout, ordering in a feed,
retention checks and coalescing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from spaces.rooms.v1 import rooms_events_pb2, rooms_resources_pb2, rooms_service_pb2

from services.common.errors import InvalidArgument
from services.rooms.live.coalesce import ReactionCoalescer, SpeakingLevelsCoalescer
from services.rooms.live.codec import EncodedEvent, assemble, split_body
from services.rooms.live.feed import FellBehind, SpaceFeed
from services.rooms.live.store import StoredEvent, Tail
from services.rooms.live.tokens import ResumeTokens

SpaceEvent = rooms_events_pb2.SpaceEvent
TOKENS = ResumeTokens(b"unit-test-secret")


def encoded(seq: int, kind: str = "participant_left") -> EncodedEvent:
    event = SpaceEvent(sequence=seq)
    if kind == "space_ended":
        event.space_ended.SetInParent()
    else:
        event.participant_left.participant = f"spaces/s/participants/p{seq}"
    return EncodedEvent.from_bytes(seq, event.SerializeToString())


# --------------------------------------------------------------------------- tokens


def test_tokens_round_trip_and_bind_their_space() -> None:
    token = TOKENS.encode("space-1", 42)
    assert TOKENS.decode("space-1", token) == 42
    assert "=" not in token and "/" not in token and "+" not in token
    for bad_space, bad_token in [
        ("space-2", token),  # another Space
        ("space-1", ResumeTokens(b"other key").encode("space-1", 42)),  # forged
        ("space-1", token[:-2]),  # cut
        ("space-1", "%%%"),  # not base64
        ("space-1", ""),
    ]:
        with pytest.raises(InvalidArgument) as raised:
            TOKENS.decode(bad_space, bad_token)
        assert raised.value.reason == "RESUME_TOKEN_INVALID"


# --------------------------------------------------------------------------- layout


def test_header_plus_body_is_the_canonical_serialization() -> None:
    event = SpaceEvent(
        mute_changed=SpaceEvent.MuteChanged(participant="spaces/s/participants/p", muted=True)
    )
    when = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)
    data = assemble(TOKENS, "s", 7, when, split_body(event))

    whole = SpaceEvent()
    whole.CopyFrom(event)
    whole.sequence = 7
    whole.resume_token = TOKENS.encode("s", 7)
    whole.event_time.FromDatetime(when)
    assert data == whole.SerializeToString(deterministic=True)
    assert SpaceEvent.FromString(data) == whole


# --------------------------------------------------------------------------- feed


async def test_feed_releases_in_order_without_duplicates() -> None:
    feed = SpaceFeed("s", 1, b"0-0", capacity=100, flush_interval_s=0)
    for seq in (3, 1, 1, 4):
        feed.offer(encoded(seq))
    assert [e.seq for e in feed.events_after(0)] == [1]
    assert feed.missing() == (2, 4)
    feed.offer(encoded(2))
    feed.offer(encoded(3))
    assert [e.seq for e in feed.events_after(0)] == [1, 2, 3, 4]
    assert feed.missing() is None
    feed.note_last_seq(6)
    assert feed.missing() == (5, 6)


async def test_feed_ring_is_bounded_and_laggards_fall_behind() -> None:
    feed = SpaceFeed("s", 1, b"0-0", capacity=3, flush_interval_s=0)
    for seq in range(1, 6):
        feed.offer(encoded(seq))
    assert [e.seq for e in feed.events_after(2)] == [3, 4, 5]
    with pytest.raises(FellBehind):
        feed.events_after(1)


async def test_feed_skips_lost_events_and_notes_the_end() -> None:
    feed = SpaceFeed("s", 1, b"0-0", capacity=10, flush_interval_s=0)
    feed.offer(encoded(4, "space_ended"))
    feed.skip_to(4)  # 1..3 were pruned before anyone here saw them
    assert [e.seq for e in feed.events_after(3)] == [4]
    assert feed.end_seq == 4
    with pytest.raises(FellBehind):
        feed.events_after(0)


async def test_feed_wakes_every_waiter_once_per_change() -> None:
    feed = SpaceFeed("s", 1, b"0-0", capacity=10, flush_interval_s=0.001)
    generation = feed.generation
    waiters = [asyncio.create_task(feed.wait(generation)) for _ in range(1000)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    feed.offer(encoded(1))
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    await asyncio.wait_for(feed.wait(generation), 1)  # a stale generation returns at once


async def test_unfiltered_watchers_share_one_response() -> None:
    feed = SpaceFeed("s", 1, b"0-0", capacity=10, flush_interval_s=0)
    feed.offer(encoded(1))
    feed.offer(encoded(2))
    events = feed.events_after(0)
    assert feed.response(events) is feed.response(feed.events_after(0))
    assert [e.sequence for e in feed.response(events).events] == [1, 2]


async def test_encoded_responses_are_the_messages_bytes_shared_once() -> None:
    feed = SpaceFeed("s", 1, b"0-0", capacity=10, flush_interval_s=0)
    sizes = [10, 200, 20_000]  # one-, two- and three-byte length prefixes
    for seq, size in enumerate(sizes, start=1):
        event = SpaceEvent(sequence=seq)
        event.caption_segment.text = "x" * size
        feed.offer(EncodedEvent.from_bytes(seq, event.SerializeToString()))
    events = feed.events_after(0)
    data = feed.encoded(events)
    assert data is feed.encoded(feed.events_after(0))
    expected = rooms_service_pb2.WatchSpaceResponse(events=[e.event for e in events])
    assert data == expected.SerializeToString()
    parsed = rooms_service_pb2.WatchSpaceResponse.FromString(data)
    assert [len(e.caption_segment.text) for e in parsed.events] == sizes
    alone = SpaceFeed.encoded_alone(events[1:2])
    assert rooms_service_pb2.WatchSpaceResponse.FromString(alone).events[0].sequence == 2


# --------------------------------------------------------------------------- retention


def test_tail_is_complete_only_without_holes() -> None:
    when = datetime.now(UTC)

    def tail(last: int, seqs: list[int]) -> Tail:
        return Tail(last, [StoredEvent(s, False, b"", when) for s in seqs])

    assert tail(5, [3, 4, 5]).complete_after(2)
    assert tail(5, []).complete_after(5)  # nothing happened since
    assert tail(0, []).complete_after(0)  # nothing ever happened
    assert not tail(5, [4, 5]).complete_after(2)  # 3 was pruned
    assert not tail(5, [3, 5]).complete_after(2)  # a hole in the middle
    assert not tail(5, []).complete_after(2)  # all pruned
    assert not tail(5, []).complete_after(9)  # a token from the future


# --------------------------------------------------------------------------- coalescing


async def test_reactions_are_counted_per_window() -> None:
    emitted: list[tuple[str, SpaceEvent]] = []

    async def emit(space_id: str, event: SpaceEvent) -> None:
        emitted.append((space_id, event))

    coalescer = ReactionCoalescer(emit, window_s=0.05)
    for i in range(300):
        coalescer.add(
            "a", rooms_resources_pb2.EMOJI_FIRE if i % 3 else rooms_resources_pb2.EMOJI_CLAP
        )
    coalescer.add("b", rooms_resources_pb2.EMOJI_HEART)
    await asyncio.sleep(0.1)
    await coalescer.flush()

    by_space = {space: event.reactions for space, event in emitted}
    assert len(emitted) == 2
    assert [(c.emoji, c.count) for c in by_space["a"].counts] == [
        (rooms_resources_pb2.EMOJI_FIRE, 200),
        (rooms_resources_pb2.EMOJI_CLAP, 100),
    ]
    assert by_space["a"].window_duration.ToMilliseconds() == 50
    assert [(c.emoji, c.count) for c in by_space["b"].counts] == [
        (rooms_resources_pb2.EMOJI_HEART, 1)
    ]


async def test_speaking_levels_keep_only_the_latest() -> None:
    emitted: list[SpaceEvent] = []

    async def emit(space_id: str, event: SpaceEvent) -> None:
        emitted.append(event)

    coalescer = SpeakingLevelsCoalescer(emit, interval_s=0.05)
    for i in range(50):
        level = rooms_resources_pb2.SpeakingLevel(participant="spaces/s/participants/p", level=i)
        coalescer.add("s", [level])
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.1)
    await coalescer.flush()

    assert 1 <= len(emitted) <= 3  # the leading report, then at most one per interval
    assert emitted[-1].speaking_levels.levels[0].level == 49
