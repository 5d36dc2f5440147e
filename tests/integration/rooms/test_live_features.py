"""Live behaviour through the real rooms service: captions toggled on an open stream,
recording state events, ListSpaces keyset pages, two replicas, and resuming a stream."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from spaces.rooms.v1 import rooms_events_pb2 as ev
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as pb_grpc

from tests.integration.rooms.harness import RoomsHarness, reason, running_rooms, started_rooms
from tests.integration.rooms.test_features import Watcher

WAIT_S = 10.0  # generous: only a failure waits this long


def at(delta: timedelta) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + delta)
    return stamp


def segment(space: res.Space, speaker: str, segment_id: str) -> res.CaptionSegment:
    return res.CaptionSegment(
        segment_id=segment_id,
        speaker=f"{space.name}/participants/{speaker}",
        text=f"text {segment_id}",
        start_offset=duration_pb2.Duration(seconds=1),
        end_offset=duration_pb2.Duration(seconds=2),
        language_code="en",
    )


async def pin(rooms: RoomsHarness, space: res.Space, host: str, text: str) -> None:
    """A change everyone sees: a marker in the Space's order."""
    await rooms.stub.PinMessage(
        pb.PinMessageRequest(name=space.name, text=text), metadata=rooms.as_user(host)
    )


async def until_pinned(watcher: Watcher, text: str) -> None:
    async def seen() -> None:
        while not any(
            e.HasField("pinned_message_changed")
            and e.pinned_message_changed.pinned_message.text == text
            for e in watcher.events
        ):
            await asyncio.sleep(0.02)

    await asyncio.wait_for(seen(), WAIT_S)


def captions_seen(watcher: Watcher) -> list[str]:
    return [e.caption_segment.segment_id for e in watcher.events if e.HasField("caption_segment")]


async def set_captions(rooms: RoomsHarness, space: res.Space, user: str, on: bool) -> None:
    await rooms.stub.SetCaptionsEnabled(
        pb.SetCaptionsEnabledRequest(name=space.name, enabled=on), metadata=rooms.as_user(user)
    )


async def post(rooms: RoomsHarness, space: res.Space, speaker: str, segment_id: str) -> None:
    await rooms.stub.PostCaptionSegment(
        pb.PostCaptionSegmentRequest(name=space.name, segment=segment(space, speaker, segment_id)),
        metadata=rooms.as_service,
    )


# --- captions -----------------------------------------------------------------------------


async def test_captions_toggled_mid_stream_apply_to_the_open_stream(rooms: RoomsHarness) -> None:
    host, fan = await rooms.users(2)
    space = await rooms.create(host)
    await rooms.join(space, fan)
    await post(rooms, space, host, "before-available")  # makes captions available
    fan_watch = Watcher(rooms, space, fan)
    host_watch = Watcher(rooms, space, host)
    await fan_watch.wait_for("snapshot", WAIT_S)
    await host_watch.wait_for("snapshot", WAIT_S)

    await post(rooms, space, host, "off-1")
    await set_captions(rooms, space, fan, True)
    await post(rooms, space, host, "on-1")
    await post(rooms, space, host, "on-2")
    await set_captions(rooms, space, fan, False)
    await post(rooms, space, host, "off-2")
    await set_captions(rooms, space, fan, True)
    await post(rooms, space, host, "on-3")
    await pin(rooms, space, host, "marker")
    await until_pinned(fan_watch, "marker")
    await until_pinned(host_watch, "marker")

    # The same stream, never reopened: segments follow the setting at their place in order.
    assert captions_seen(fan_watch) == ["on-1", "on-2", "on-3"]
    assert [
        e.captions_setting_changed.enabled
        for e in fan_watch.events
        if e.HasField("captions_setting_changed")
    ] == [True, False, True]
    assert fan_watch.kinds().count("snapshot") == 1
    # The host never turned captions on, and the fan's setting is the fan's own business.
    assert captions_seen(host_watch) == []
    assert "captions_setting_changed" not in host_watch.kinds()
    fan_watch.call.cancel()
    host_watch.call.cancel()


async def test_captions_turned_on_through_another_replica(rooms: RoomsHarness) -> None:
    host, fan = await rooms.users(2)
    space = await rooms.create(host)
    await rooms.join(space, fan)
    await post(rooms, space, host, "available")
    fan_watch = Watcher(rooms, space, fan)
    await fan_watch.wait_for("snapshot", WAIT_S)
    async with started_rooms(rooms.common) as (_, _, channel):
        other = pb_grpc.RoomsServiceStub(channel)
        await other.SetCaptionsEnabled(
            pb.SetCaptionsEnabledRequest(name=space.name, enabled=True),
            metadata=rooms.as_user(fan),
        )
        await other.PostCaptionSegment(
            pb.PostCaptionSegmentRequest(name=space.name, segment=segment(space, host, "b-1")),
            metadata=rooms.as_service,
        )
    await pin(rooms, space, host, "marker")
    await until_pinned(fan_watch, "marker")
    assert captions_seen(fan_watch) == ["b-1"]
    fan_watch.call.cancel()


# --- recording ----------------------------------------------------------------------------


async def test_recording_state_changes_reach_everyone(rooms: RoomsHarness) -> None:
    host, fan = await rooms.users(2)
    space = await rooms.create(host, recording=True, scheduled_start_time=at(timedelta(hours=1)))
    assert space.recording
    assert space.recording_state == res.RECORDING_STATE_UNSPECIFIED
    host_watch = Watcher(rooms, space, host)
    await host_watch.wait_for("snapshot", WAIT_S)
    started = await rooms.stub.StartSpace(
        pb.StartSpaceRequest(name=space.name), metadata=rooms.as_user(host)
    )
    assert started.space.recording_state == res.RECORDING_STATE_ACTIVE
    active = await host_watch.wait_for("recording_state_changed", WAIT_S)
    assert active.recording_state_changed.state == res.RECORDING_STATE_ACTIVE
    assert active.recording_state_changed.recording == f"{space.name}/recordings/r1"
    assert rooms.media.of("OpenSpace")[-1].record

    joined = await rooms.join(space, fan)
    assert joined.recording  # apps must tell the user before they connect
    got = await rooms.stub.GetSpace(
        pb.GetSpaceRequest(name=space.name), metadata=rooms.as_user(fan)
    )
    assert got.space.recording and got.space.recording_state == res.RECORDING_STATE_ACTIVE
    fan_watch = Watcher(rooms, space, fan)
    first = await fan_watch.wait_for("snapshot", WAIT_S)
    assert first.snapshot.space.recording_state == res.RECORDING_STATE_ACTIVE

    await rooms.stub.EndSpace(pb.EndSpaceRequest(name=space.name), metadata=rooms.as_user(host))
    await asyncio.wait_for(host_watch.done, WAIT_S)
    await asyncio.wait_for(fan_watch.done, WAIT_S)
    for watcher in (host_watch, fan_watch):
        changes = [
            e.recording_state_changed
            for e in watcher.events
            if e.HasField("recording_state_changed")
        ]
        assert changes[-1].state == res.RECORDING_STATE_STOPPED
        assert changes[-1].recording == f"{space.name}/recordings/r1"
        assert watcher.kinds()[-2:] == ["recording_state_changed", "space_ended"]
    assert host_watch.events[-1].space_ended.space.recording_state == res.RECORDING_STATE_STOPPED


async def test_unrecorded_space_has_no_recording_events(rooms: RoomsHarness) -> None:
    host, fan = await rooms.users(2)
    space = await rooms.create(host, scheduled_start_time=at(timedelta(hours=1)))
    host_watch = Watcher(rooms, space, host)
    await host_watch.wait_for("snapshot", WAIT_S)
    await rooms.stub.StartSpace(pb.StartSpaceRequest(name=space.name), metadata=rooms.as_user(host))
    joined = await rooms.join(space, fan)
    assert not joined.recording
    await rooms.stub.EndSpace(pb.EndSpaceRequest(name=space.name), metadata=rooms.as_user(host))
    await asyncio.wait_for(host_watch.done, WAIT_S)
    assert "recording_state_changed" not in host_watch.kinds()
    assert host_watch.events[-1].space_ended.space.recording_state == (
        res.RECORDING_STATE_UNSPECIFIED
    )


# --- ListSpaces -----------------------------------------------------------------------------


async def list_page(
    rooms: RoomsHarness, user: str, token: str, size: int = 2, host: str = ""
) -> pb.ListSpacesResponse:
    response: pb.ListSpacesResponse = await rooms.stub.ListSpaces(
        pb.ListSpacesRequest(page_size=size, page_token=token, host=host),
        metadata=rooms.as_user(user),
    )
    return response


async def test_list_spaces_pages_are_stable_under_inserts(rooms: RoomsHarness) -> None:
    viewer, *hosts = await rooms.users(13)
    before = [await rooms.create(h) for h in hosts[:3]]
    before += [
        await rooms.create(h, scheduled_start_time=at(timedelta(hours=n + 1)))
        for n, h in enumerate(hosts[3:6])
    ]
    seen: list[str] = []
    token = ""
    added = 0
    while True:
        page = await list_page(rooms, viewer, token)
        seen += [s.name for s in page.spaces]
        token = page.next_page_token
        if not token:
            break
        # Between pages, new Spaces land both before the position already read (newer
        # live Spaces come first) and after it (later scheduled ones).
        if added < 3:
            await rooms.create(hosts[6 + added])
            await rooms.create(
                hosts[9 + added], scheduled_start_time=at(timedelta(hours=20 + added))
            )
            added += 1
    assert len(seen) == len(set(seen)), "a Space appeared on two pages"
    assert [n for n in seen if n in {s.name for s in before}] == [
        *(s.name for s in reversed(before[:3])),
        *(s.name for s in before[3:]),
    ]
    # Added later than the position read so far: the later scheduled ones are all listed.
    assert sum(1 for n in seen if n not in {s.name for s in before}) == 3


async def test_list_spaces_refuses_garbage_and_foreign_tokens(rooms: RoomsHarness) -> None:
    viewer, other, *hosts = await rooms.users(5)
    for host in hosts:
        await rooms.create(host)
    token = (await list_page(rooms, viewer, "", size=1)).next_page_token
    assert token
    body, _, mac = token.partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["k"][1] += 1
    tampered = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    cases = {
        "garbage": "not-a-token",
        "tampered": f"{tampered}.{mac}",
        "truncated": token[:-3],
        "another caller": token,
        "another query": token,
    }
    for case, bad in cases.items():
        user = other if case == "another caller" else viewer
        host = f"users/{hosts[0]}" if case == "another query" else ""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_page(rooms, user, bad, size=1, host=host)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert reason(caught.value) == "PAGE_TOKEN_INVALID", case
    # The genuine token still works for its own query.
    assert len((await list_page(rooms, viewer, token, size=1)).spaces) == 1


# --- replicas and resume --------------------------------------------------------------------


async def watch_until(
    stub: pb_grpc.RoomsServiceStub,
    rooms: RoomsHarness,
    space: res.Space,
    user: str,
    stop: str,
    resume_token: str = "",
    opened: asyncio.Event | None = None,
) -> list[ev.SpaceEvent]:
    """Events of one stream until a pinned message with text ``stop``; ``opened`` is set
    once the first message (the snapshot) arrived."""
    events: list[ev.SpaceEvent] = []
    call = stub.WatchSpace(
        pb.WatchSpaceRequest(name=space.name, resume_token=resume_token),
        metadata=rooms.as_user(user),
    )
    async for response in call:
        events.extend(response.events)
        if opened is not None:
            opened.set()
        if any(e.pinned_message_changed.pinned_message.text == stop for e in response.events):
            call.cancel()
            break
    return events


async def test_two_rooms_replicas_give_every_watcher_the_same_sequence(
    rooms: RoomsHarness,
) -> None:
    host, *people = await rooms.users(7)
    space = await rooms.create(host)
    async with started_rooms(rooms.common) as (_, _, channel):
        stubs = [rooms.stub, pb_grpc.RoomsServiceStub(channel)]
        opened = [asyncio.Event(), asyncio.Event()]
        watches = [
            asyncio.create_task(watch_until(stub, rooms, space, host, "the end", opened=ready))
            for stub, ready in zip(stubs, opened, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), WAIT_S)

        async def session(i: int, user: str) -> None:
            stub = stubs[i % 2]
            other = stubs[(i + 1) % 2]
            await stub.JoinSpace(
                pb.JoinSpaceRequest(name=space.name, request_id=str(uuid.uuid4())),
                metadata=rooms.as_user(user),
            )
            await other.RequestToSpeak(
                pb.RequestToSpeakRequest(name=space.name), metadata=rooms.as_user(user)
            )
            await stub.ApproveSpeaker(
                pb.ApproveSpeakerRequest(name=f"{space.name}/participants/{user}"),
                metadata=rooms.as_user(host),
            )
            await other.SetOwnMute(
                pb.SetOwnMuteRequest(name=space.name, muted=False), metadata=rooms.as_user(user)
            )
            await stub.SendReaction(
                pb.SendReactionRequest(name=space.name, emoji=res.EMOJI_FIRE),
                metadata=rooms.as_user(user),
            )

        await asyncio.gather(*(session(i, u) for i, u in enumerate(people)))
        await pin(rooms, space, host, "the end")
        streams = await asyncio.wait_for(asyncio.gather(*watches), WAIT_S)
    # Compare from the first event both streams carry after their snapshots.
    after = max(s[0].sequence for s in streams)
    tails = [[e for e in s if e.sequence > after and not e.HasField("snapshot")] for s in streams]
    assert tails[0], "nothing happened after the snapshots"
    assert [e.SerializeToString() for e in tails[0]] == [e.SerializeToString() for e in tails[1]]
    sequences = [e.sequence for e in tails[0]]
    assert sequences == sorted(set(sequences))
    kinds = {e.WhichOneof("event") for e in tails[0]}
    assert {"participant_joined", "hand_raised", "role_changed", "mute_changed"} <= kinds


async def test_resume_on_another_replica_misses_nothing(rooms: RoomsHarness) -> None:
    host, *people = await rooms.users(4)
    space = await rooms.create(host)
    call = rooms.stub.WatchSpace(
        pb.WatchSpaceRequest(name=space.name), metadata=rooms.as_user(host)
    )
    stream = aiter(call)
    got: list[ev.SpaceEvent] = list((await asyncio.wait_for(anext(stream), WAIT_S)).events)
    assert got[0].HasField("snapshot")
    await pin(rooms, space, host, "one")
    while not any(e.pinned_message_changed.pinned_message.text == "one" for e in got):
        got.extend((await asyncio.wait_for(anext(stream), WAIT_S)).events)
    call.cancel()  # the app loses its connection
    token = got[-1].resume_token
    # Meanwhile: joins, a hand, an approval, a pin (all well within the resume window).
    for user in people:
        await rooms.join(space, user)
    await rooms.make_speaker(space, host, people[0])
    await pin(rooms, space, host, "two")
    async with started_rooms(rooms.common) as (_, _, channel):
        resumed = await asyncio.wait_for(
            watch_until(
                pb_grpc.RoomsServiceStub(channel), rooms, space, host, "two", resume_token=token
            ),
            WAIT_S,
        )
    assert not any(e.HasField("snapshot") for e in resumed)
    assert resumed[0].sequence == got[-1].sequence + 1
    sequences = [e.sequence for e in resumed]
    # Gap-free: this watcher (the host) may see every durable event; the only numbers it
    # may lack are ephemeral ones (none here) and counts, which are durable too.
    assert sequences == list(range(sequences[0], sequences[-1] + 1))
    joined = {
        e.participant_joined.participant.user for e in resumed if e.HasField("participant_joined")
    }
    assert joined == {f"users/{u}" for u in people}
    assert any(e.HasField("role_changed") for e in resumed)


# --- big Spaces -----------------------------------------------------------------------------


async def test_listener_joins_are_announced_only_while_the_space_is_small(
    database_url: str, redis_url: str
) -> None:
    async with running_rooms(database_url, redis_url, listener_events_max=3) as rooms:
        host, *crowd = await rooms.users(6)
        space = await rooms.create(host)
        watcher = Watcher(rooms, space, host)
        await watcher.wait_for("snapshot", WAIT_S)
        for user in crowd:
            await rooms.join(space, user)
        await rooms.make_speaker(space, host, crowd[-1])
        await rooms.stub.LeaveSpace(
            pb.LeaveSpaceRequest(name=space.name), metadata=rooms.as_user(crowd[0])
        )
        await rooms.stub.LeaveSpace(
            pb.LeaveSpaceRequest(name=space.name), metadata=rooms.as_user(crowd[-1])
        )
        await pin(rooms, space, host, "marker")
        await until_pinned(watcher, "marker")
        joined = [
            e.participant_joined.participant.user
            for e in watcher.events
            if e.HasField("participant_joined")
        ]
        left = [
            e.participant_left.participant for e in watcher.events if e.HasField("participant_left")
        ]
        # Host + 2 listeners make 3: announced; from the 4th participant on, listeners are not.
        assert joined == [f"users/{u}" for u in crowd[:2]]
        # crowd[0] left a big Space as a listener: not announced; the speaker's leave is.
        assert left == [f"{space.name}/participants/{crowd[-1]}"]
        # The speaker came on stage: everyone learned who they are from role_changed.
        promoted = [e for e in watcher.events if e.HasField("role_changed")]
        assert promoted[-1].role_changed.participant.user == f"users/{crowd[-1]}"
        # The counts still say how many are there.
        counts = [
            e.participant_counts_changed.counts
            for e in watcher.events
            if e.HasField("participant_counts_changed")
        ]
        assert counts
        watcher.call.cancel()


# --- ListParticipants and the discovery feed: keyset pages -------------------------------


async def participant_names(
    rooms: RoomsHarness,
    space: res.Space,
    user: str,
    between: list[Callable[[], Awaitable[None]]],
    hands: bool = False,
) -> list[str]:
    """Every participant, page by page (size 2), running ``between.pop(0)`` between pages."""
    names: list[str] = []
    token = ""
    while True:
        page = await rooms.stub.ListParticipants(
            pb.ListParticipantsRequest(
                parent=space.name, page_size=2, page_token=token, hand_raised_only=hands
            ),
            metadata=rooms.as_user(user),
        )
        names += [p.user.removeprefix("users/") for p in page.participants]
        token = page.next_page_token
        if not token:
            return names
        if between:
            await between.pop(0)()


async def test_participant_pages_are_stable_under_joins_and_leaves(rooms: RoomsHarness) -> None:
    host, *crowd = await rooms.users(10)
    space = await rooms.create(host)
    for user in crowd[:6]:
        await rooms.join(space, user)

    async def leave(user: str) -> None:
        await rooms.stub.LeaveSpace(
            pb.LeaveSpaceRequest(name=space.name), metadata=rooms.as_user(user)
        )

    async def join(user: str) -> None:
        await rooms.join(space, user)

    # After the first page (host, crowd[0]): one already listed leaves, which moved every
    # later row up one place under offset paging (one was skipped); after the second,
    # newcomers join at the end.
    names = await participant_names(
        rooms,
        space,
        host,
        [lambda: leave(crowd[0]), lambda: join(crowd[6]), lambda: join(crowd[7])],
    )
    assert len(names) == len(set(names)), "someone was listed twice"
    assert names[:2] == [host, crowd[0]]
    assert names[2:] == [*crowd[1:6], crowd[6], crowd[7]], "nobody is skipped"

    # Raised hands, oldest first, with the same guarantees.
    for user in crowd[1:6]:
        await rooms.stub.RequestToSpeak(
            pb.RequestToSpeakRequest(name=space.name),
            metadata=rooms.as_user(user),
        )
    hands = await participant_names(rooms, space, host, [lambda: leave(crowd[1])], hands=True)
    assert hands == crowd[1:6]


async def test_discovery_feed_pages_are_stable_when_a_space_starts(rooms: RoomsHarness) -> None:
    me, *hosts = await rooms.users(5)
    for host in hosts:
        await rooms.follow(me, host)
    live = [await rooms.create(host) for host in hosts[:3]]
    names: list[str] = []
    token = ""
    started = False
    while True:
        page = await rooms.stub.GetDiscoveryFeed(
            pb.GetDiscoveryFeedRequest(
                name="users/me/discoveryFeed", page_size=1, page_token=token
            ),
            metadata=rooms.as_user(me),
        )
        names += [item.space.name for item in page.items]
        token = page.next_page_token
        if not token:
            break
        if not started:
            # Newest first: it goes before everything read, which shifted an offset by one.
            await rooms.create(hosts[3])
            started = True
    assert names == [s.name for s in reversed(live)], "no repeats, nobody skipped"
