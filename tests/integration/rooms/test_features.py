"""Watching, reminders and outbox events, reactions, captions, reports, lists and the feed."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import redis.asyncio
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from spaces.rooms.v1 import rooms_events_pb2 as ev
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb

from services.common.events import StreamEvent, stream_name
from tests.integration.rooms.harness import RoomsHarness, reason


def at(delta: timedelta) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + delta)
    return stamp


async def outbox_events(rooms: RoomsHarness, count: int, timeout: float = 5.0) -> list[StreamEvent]:
    client = redis.asyncio.Redis.from_url(rooms.common.redis_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            entries = await client.xrange(stream_name("rooms"))
            if len(entries) >= count or time.monotonic() > deadline:
                return [StreamEvent.from_entry(i, f) for i, f in entries]
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


class Watcher:
    """Collects a WatchSpace stream's events in the background."""

    def __init__(self, rooms: RoomsHarness, space: res.Space, user: str) -> None:
        self.events: list[ev.SpaceEvent] = []
        self.call = rooms.stub.WatchSpace(
            pb.WatchSpaceRequest(name=space.name), metadata=rooms.as_user(user)
        )
        self.done = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            self.events.extend(response.events)

    def kinds(self) -> list[str]:
        return [e.WhichOneof("event") or "" for e in self.events]

    async def wait_for(self, kind: str, timeout: float = 3.0) -> ev.SpaceEvent:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.WhichOneof("event") == kind:
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind} in {self.kinds()}")
            await asyncio.sleep(0.02)


async def test_watch_space_streams_changes_with_private_events_for_moderators(
    rooms: RoomsHarness,
) -> None:
    host, hand, other = await rooms.users(3)
    space = await rooms.create(host)
    await rooms.join(space, hand)
    await rooms.join(space, other)
    as_host, as_other = Watcher(rooms, space, host), Watcher(rooms, space, other)
    await as_host.wait_for("snapshot")
    await as_other.wait_for("snapshot")
    await rooms.stub.RequestToSpeak(
        pb.RequestToSpeakRequest(name=space.name), metadata=rooms.as_user(hand)
    )
    raised = await as_host.wait_for("hand_raised")
    assert raised.hand_raised.participant.user == f"users/{hand}"
    await rooms.stub.ApproveSpeaker(
        pb.ApproveSpeakerRequest(name=f"{space.name}/participants/{hand}"),
        metadata=rooms.as_user(host),
    )
    changed = await as_other.wait_for("role_changed")
    assert changed.role_changed.new_role == res.PARTICIPANT_ROLE_SPEAKER
    assert "hand_raised" not in as_other.kinds()  # raised hands are for moderators
    await rooms.stub.EndSpace(pb.EndSpaceRequest(name=space.name), metadata=rooms.as_user(host))
    await asyncio.wait_for(asyncio.gather(as_host.done, as_other.done), 5)
    assert as_other.kinds()[-1] == "space_ended"
    sequences = [e.sequence for e in as_host.events]
    assert sequences == sorted(sequences)


async def test_removed_watcher_stream_ends(rooms: RoomsHarness) -> None:
    host, user = await rooms.users(2)
    space = await rooms.create(host)
    await rooms.join(space, user)
    watcher = Watcher(rooms, space, user)
    await watcher.wait_for("snapshot")
    await rooms.stub.RemoveParticipant(
        pb.RemoveParticipantRequest(name=f"{space.name}/participants/{user}"),
        metadata=rooms.as_user(host),
    )
    await asyncio.wait_for(watcher.done, 5)
    assert watcher.kinds()[-1] in ("participant_removed", "participant_counts_changed")
    assert "participant_removed" in watcher.kinds()


async def test_reminders_and_schedule_events(rooms: RoomsHarness) -> None:
    host, fan = await rooms.users(2)
    space = await rooms.create(host, scheduled_start_time=at(timedelta(hours=3)))
    reminder = await rooms.stub.CreateReminder(
        pb.CreateReminderRequest(parent=space.name), metadata=rooms.as_user(fan)
    )
    assert reminder.reminder.name == f"{space.name}/reminders/{fan}"
    again = await rooms.stub.CreateReminder(
        pb.CreateReminderRequest(parent=space.name), metadata=rooms.as_user(fan)
    )
    assert again.reminder.create_time == reminder.reminder.create_time
    seen = await rooms.stub.GetSpace(
        pb.GetSpaceRequest(name=space.name), metadata=rooms.as_user(fan)
    )
    assert seen.space.reminder_set
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.DeleteReminder(
            pb.DeleteReminderRequest(name=f"{space.name}/reminders/{host}"),
            metadata=rooms.as_user(fan),
        )
    assert reason(caught.value) == "NOT_SELF"
    await rooms.stub.UpdateSpace(
        pb.UpdateSpaceRequest(
            space=res.Space(name=space.name, scheduled_start_time=at(timedelta(hours=5))),
            update_mask=field_mask_pb2.FieldMask(paths=["scheduled_start_time"]),
        ),
        metadata=rooms.as_user(host),
    )
    await rooms.stub.DeleteReminder(
        pb.DeleteReminderRequest(name=f"{space.name}/reminders/me"), metadata=rooms.as_user(fan)
    )
    await rooms.stub.CancelSpace(
        pb.CancelSpaceRequest(name=space.name), metadata=rooms.as_user(host)
    )
    events = await outbox_events(rooms, 5)
    assert [e.type for e in events] == [
        "space.scheduled",
        "reminder.set",
        "space.rescheduled",
        "reminder.deleted",
        "space.canceled",
    ]
    canceled = events[-1].unpack(ev.SpaceCanceledEvent)
    assert canceled.reason == res.SPACE_END_REASON_HOST_CANCELED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.CreateReminder(
            pb.CreateReminderRequest(parent=space.name), metadata=rooms.as_user(fan)
        )
    assert reason(caught.value) == "SPACE_NOT_SCHEDULED"


async def test_reactions_are_rate_limited_per_participant(rooms: RoomsHarness) -> None:
    host, fan = await rooms.users(2)
    space = await rooms.create(host)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.SendReaction(
            pb.SendReactionRequest(name=space.name, emoji=res.EMOJI_FIRE),
            metadata=rooms.as_user(fan),
        )
    assert reason(caught.value) == "NOT_PARTICIPANT"
    await rooms.join(space, fan)
    # Twelve at once land in at most two one-second windows, so one window sees six or
    # more, whatever the machine's speed.
    results = await asyncio.gather(
        *(
            rooms.stub.SendReaction(
                pb.SendReactionRequest(name=space.name, emoji=res.EMOJI_FIRE),
                metadata=rooms.as_user(fan),
            )
            for _ in range(12)
        ),
        return_exceptions=True,
    )
    outcomes = ["ok" if not isinstance(r, BaseException) else reason(r) for r in results]  # type: ignore[arg-type]
    assert outcomes.count("ok") >= 5
    assert set(outcomes) == {"ok", "RATE_LIMITED"}
    # The host's own budget is separate.
    await rooms.stub.SendReaction(
        pb.SendReactionRequest(name=space.name, emoji=res.EMOJI_CLAP), metadata=rooms.as_user(host)
    )


async def test_captions(rooms: RoomsHarness) -> None:
    host, fan = await rooms.users(2)
    space = await rooms.create(host)
    await rooms.join(space, fan)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.SetCaptionsEnabled(
            pb.SetCaptionsEnabledRequest(name=space.name, enabled=True), metadata=rooms.as_user(fan)
        )
    assert reason(caught.value) == "CAPTIONS_UNAVAILABLE"
    segment = res.CaptionSegment(
        segment_id="a1",
        speaker=f"{space.name}/participants/{host}",
        text="hello",
        start_offset=duration_pb2.Duration(seconds=1),
        end_offset=duration_pb2.Duration(seconds=2),
        language_code="en",
    )
    posted = await rooms.stub.PostCaptionSegment(
        pb.PostCaptionSegmentRequest(name=space.name, segment=segment), metadata=rooms.as_service
    )
    assert posted.sequence > 0
    enabled = await rooms.stub.SetCaptionsEnabled(
        pb.SetCaptionsEnabledRequest(name=space.name, enabled=True), metadata=rooms.as_user(fan)
    )
    assert enabled.participant.captions_enabled
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.PostCaptionSegment(
            pb.PostCaptionSegmentRequest(name=space.name, segment=segment)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_reports_keep_context_and_deduplicate(rooms: RoomsHarness) -> None:
    host, speaker, reporter = await rooms.users(3)
    space = await rooms.create(host)
    await rooms.join(space, speaker)
    await rooms.join(space, reporter)
    await rooms.make_speaker(space, host, speaker)
    await rooms.stub.SetOwnMute(
        pb.SetOwnMuteRequest(name=space.name, muted=False), metadata=rooms.as_user(speaker)
    )
    level = res.SpeakingLevel(
        participant=f"{space.name}/participants/{speaker}", level=0.8, speaking=True
    )
    await rooms.stub.ReportSpeakingLevels(
        pb.ReportSpeakingLevelsRequest(
            name=space.name, levels=[level], observe_time=at(timedelta(0))
        ),
        metadata=rooms.as_service,
    )
    first = await rooms.stub.ReportParticipant(
        pb.ReportParticipantRequest(
            name=f"{space.name}/participants/{speaker}", reason=res.REPORT_REASON_HARASSMENT
        ),
        metadata=rooms.as_user(reporter),
    )
    again = await rooms.stub.ReportParticipant(
        pb.ReportParticipantRequest(
            name=f"{space.name}/participants/{speaker}", reason=res.REPORT_REASON_HARASSMENT
        ),
        metadata=rooms.as_user(reporter),
    )
    assert first.report_id == again.report_id
    [(context,)] = await rooms.sql("SELECT context FROM reports WHERE id = %s", first.report_id)
    assert speaker in context["unmuted"]
    assert context["speaking"]["users"] == [speaker]
    assert {p["user_id"] for p in context["stage"]} == {host, speaker}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.ReportParticipant(
            pb.ReportParticipantRequest(
                name=f"{space.name}/participants/me", reason=res.REPORT_REASON_SPAM
            ),
            metadata=rooms.as_user(reporter),
        )
    assert reason(caught.value) == "TARGET_IS_CALLER"
    space_report = await rooms.stub.ReportSpace(
        pb.ReportSpaceRequest(name=space.name, reason=res.REPORT_REASON_SPAM, note="ads"),
        metadata=rooms.as_user(reporter),
    )
    assert space_report.report_id != first.report_id


async def test_discovery_feed(rooms: RoomsHarness) -> None:
    me, hosting, listening, other_host, planner, private_host, blocker = await rooms.users(7)
    for user in (hosting, listening, planner, private_host, blocker):
        await rooms.follow(me, user)
    live = await rooms.create(hosting, title="Live by a friend")
    elsewhere = await rooms.create(other_host, title="Where my friend listens")
    await rooms.join(elsewhere, listening)
    upcoming = await rooms.create(
        planner, title="Later", scheduled_start_time=at(timedelta(hours=2))
    )
    hidden = await rooms.create(private_host, visibility=res.SPACE_VISIBILITY_FOLLOWED_BY_HOST)
    blocked = await rooms.create(blocker)
    await rooms.block(blocker, me)
    # The block removed the follow; follow again is refused, so check the block is honoured
    # through a friend who listens there instead.
    await rooms.join(blocked, listening)

    feed = await rooms.stub.GetDiscoveryFeed(
        pb.GetDiscoveryFeedRequest(name="users/me/discoveryFeed"), metadata=rooms.as_user(me)
    )
    got = [(item.space.name, item.reason) for item in feed.items]
    assert got == [
        (live.name, res.DISCOVERY_REASON_HOSTED_BY_FOLLOWED),
        (elsewhere.name, res.DISCOVERY_REASON_FOLLOWED_PARTICIPATING),
        (upcoming.name, res.DISCOVERY_REASON_SCHEDULED_BY_FOLLOWED),
    ]
    assert hidden.name not in [n for n, _ in got]
    assert list(feed.items[1].followed_participants) == [f"users/{listening}"]
    page = await rooms.stub.GetDiscoveryFeed(
        pb.GetDiscoveryFeedRequest(name="users/me/discoveryFeed", page_size=2),
        metadata=rooms.as_user(me),
    )
    rest = await rooms.stub.GetDiscoveryFeed(
        pb.GetDiscoveryFeedRequest(
            name="users/me/discoveryFeed", page_size=2, page_token=page.next_page_token
        ),
        metadata=rooms.as_user(me),
    )
    assert [i.space.name for i in [*page.items, *rest.items]] == [n for n, _ in got]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.GetDiscoveryFeed(
            pb.GetDiscoveryFeedRequest(name=f"users/{hosting}/discoveryFeed"),
            metadata=rooms.as_user(me),
        )
    assert reason(caught.value) == "NOT_SELF"


async def test_list_spaces_order_and_pages(rooms: RoomsHarness) -> None:
    a, b, c = await rooms.users(3)
    first = await rooms.create(a)
    second = await rooms.create(b)
    soon = await rooms.create(c, scheduled_start_time=at(timedelta(hours=1)))
    later = await rooms.create(c, scheduled_start_time=at(timedelta(hours=2)))
    names: list[str] = []
    token = ""
    while True:
        page = await rooms.stub.ListSpaces(
            pb.ListSpacesRequest(page_size=1, page_token=token), metadata=rooms.as_user(a)
        )
        names += [s.name for s in page.spaces]
        token = page.next_page_token
        if not token:
            break
    assert names == [second.name, first.name, soon.name, later.name]
    mine = await rooms.stub.ListSpaces(
        pb.ListSpacesRequest(host="users/me"), metadata=rooms.as_user(c)
    )
    assert [s.name for s in mine.spaces] == [soon.name, later.name]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.stub.ListSpaces(
            pb.ListSpacesRequest(page_token="forged"), metadata=rooms.as_user(a)
        )
    assert reason(caught.value) == "PAGE_TOKEN_INVALID"


async def test_participant_counts_are_coalesced_but_end_up_right(rooms: RoomsHarness) -> None:
    host, *crowd = await rooms.users(21)
    space = await rooms.create(host)
    watcher = Watcher(rooms, space, host)
    await watcher.wait_for("snapshot")
    await asyncio.gather(*(rooms.join(space, u) for u in crowd))
    deadline = time.monotonic() + 3
    while True:
        counts = [
            e.participant_counts_changed.counts
            for e in watcher.events
            if e.HasField("participant_counts_changed")
        ]
        if (counts and counts[-1].total_count == 21) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert counts[-1].listener_count == 20 and counts[-1].total_count == 21
    assert len(counts) <= 4  # twenty joins, about a second: not twenty events
    watcher.call.cancel()
