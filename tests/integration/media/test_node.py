"""Media nodes in a fleet: real Valkey registry, real engines, real aiortc apps on loopback.

Rooms is replaced by :class:`RoomsRecorder`, which keeps what the nodes report to it (peer
states, levels, reconnect requests): the node's side of that contract is what is tested
here; the stack test covers the real rooms.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import redis.asyncio
from spaces.media.v1 import media_events_pb2 as media_events
from spaces.media.v1 import media_resources_pb2 as media_res

from services.common.errors import (
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.common.grants import MediaGrantVerifier
from services.media.captions import CaptionSegmentData
from services.media.config import MediaConfig
from services.media.engine import MediaEngine
from services.media.levels import SpeakerLevel
from services.media.node import MediaNode, NodeOptions, PeerChange
from services.media.registry import NodeRegistry, ParticipantPermissions
from tests.integration.media.conftest import GRANT_SECRET, AppFactory, media_grant
from tests.integration.media.peers import App, Speech, Tone, eventually, heard

SPACE = "space-1"
SILENCE_RMS = 50.0


@dataclass
class RoomsRecorder:
    """What rooms would receive from media nodes."""

    changes: list[PeerChange] = field(default_factory=list)
    levels: list[tuple[str, list[SpeakerLevel]]] = field(default_factory=list)
    reconnects: list[tuple[str, list[str], bool, str]] = field(default_factory=list)
    captions: list[tuple[str, CaptionSegmentData]] = field(default_factory=list)

    async def post_caption(self, space: str, segment: CaptionSegmentData) -> None:
        self.captions.append((space, segment))

    async def report_peer_states(self, node: str, changes: Sequence[PeerChange]) -> None:
        self.changes.extend(changes)

    async def report_levels(
        self, space: str, levels: Sequence[SpeakerLevel], observe_time: float
    ) -> None:
        self.levels.append((space, list(levels)))

    async def request_reconnect(
        self, space: str, participants: Sequence[str], *, draining: bool, from_node: str
    ) -> None:
        self.reconnects.append((space, list(participants), draining, from_node))


Fleet = Callable[..., "asyncio.Future[MediaNode]"]


class LocalNodeLink:
    """Node-to-node calls within the test process (the gRPC form is GrpcNodeLink)."""

    def __init__(self) -> None:
        self.nodes: dict[str, MediaNode] = {}

    async def open_relay(
        self, address: str, space: str, edge_node: str, sdp_offer: str
    ) -> tuple[str, str]:
        negotiation = await self.nodes[address].open_relay(space, edge_node, sdp_offer)
        return negotiation.session, negotiation.sdp_answer

    async def close_relay(self, address: str, space: str, relay: str) -> None:
        await self.nodes[address].close_served_relay(space, relay)


@pytest.fixture
def rooms() -> RoomsRecorder:
    return RoomsRecorder()


@pytest.fixture
async def fleet(
    redis_client: redis.asyncio.Redis, rooms: RoomsRecorder, tmp_path: Path
) -> AsyncIterator[Callable[[str], asyncio.Future[MediaNode]]]:
    """Start media nodes by id, all sharing the test's Redis database."""
    link = LocalNodeLink()
    async with AsyncExitStack() as stack:

        async def start(
            node_id: str, capacity: int = 100, captions: bool = False, negotiations: int = 32
        ) -> MediaNode:
            recordings = tmp_path / "recordings" / node_id
            node = MediaNode(
                MediaEngine(MediaConfig(rtcp_interval=0.5, levels_interval=0.1)),
                NodeRegistry(redis_client, node_ttl_s=1.5),
                MediaGrantVerifier(GRANT_SECRET),
                rooms,
                NodeOptions(
                    node_id=node_id,
                    address=f"{node_id}.test:50053",
                    capacity=capacity,
                    heartbeat_s=0.3,
                    drain_grace_s=2.0,
                    levels_interval_s=0.1,
                    recordings_dir=recordings,
                    captions=captions,
                    max_negotiations=negotiations,
                ),
                link,
            )
            link.nodes[node.options.address] = node
            await node.start()
            stack.push_async_callback(node.stop)
            return node

        def launch(
            node_id: str, capacity: int = 100, captions: bool = False, negotiations: int = 32
        ) -> asyncio.Future[MediaNode]:
            return asyncio.ensure_future(start(node_id, capacity, captions, negotiations))

        yield launch


def grant(user: str, node: str, **options: Any) -> str:
    """A grant for ``user`` in SPACE on ``node`` (options as :func:`media_grant` takes)."""
    return media_grant(SPACE, user, node, **options)


async def connect(node: MediaNode, app: App, user: str, *, publish: bool = False) -> str:
    """Negotiate ``app`` with ``node`` the way an app does, with a fresh grant."""
    offer = await app.offer()
    token = grant(user, node.node_id, publish=publish)
    negotiation, _ = await node.negotiate(user, node.name, token, offer)
    await app.accept(negotiation.sdp_answer)
    await node.engine.wait_connected(negotiation.session, timeout=20)
    return negotiation.session


async def test_placement_opens_a_space_on_the_least_loaded_node_and_keeps_it(
    fleet: Callable[..., asyncio.Future[MediaNode]],
) -> None:
    a, b = await fleet("media-a"), await fleet("media-b", capacity=1000)
    origin = await a.open_space(SPACE, record=False)
    assert origin == "media-a", "equal load (0): the lowest id wins"
    assert await b.open_space(SPACE, record=True) == "media-a", "a second call keeps it"
    placement = await b.place(SPACE, "alice", may_publish=False, avoid=None)
    assert placement.node.node_id == "media-a" and placement.origin
    assert (await a.registry.space(SPACE)).record, "recording can be turned on later"


async def test_placing_in_a_space_never_opened_or_closed_is_refused(
    fleet: Callable[..., asyncio.Future[MediaNode]],
) -> None:
    node = await fleet("media-a")
    with pytest.raises(FailedPrecondition) as never:
        await node.place("nope", "alice", may_publish=False, avoid=None)
    assert never.value.reason == "SPACE_NOT_OPEN"
    await node.open_space(SPACE, record=False)
    await node.close_space(SPACE)
    with pytest.raises(FailedPrecondition) as closed:
        await node.place(SPACE, "alice", may_publish=False, avoid=None)
    assert closed.value.reason == "SPACE_NOT_OPEN"
    with pytest.raises(FailedPrecondition) as reopened:
        await node.open_space(SPACE, record=False)
    assert reopened.value.reason == "SPACE_CLOSED"


async def test_a_full_origin_refuses_listeners_but_takes_publishers(
    fleet: Callable[..., asyncio.Future[MediaNode]],
) -> None:
    node = await fleet("media-a", capacity=2)
    await node.open_space(SPACE, record=False)
    await node.place(SPACE, "l1", may_publish=False, avoid=None)
    await node.place(SPACE, "l2", may_publish=False, avoid=None)
    with pytest.raises(Unavailable) as full:
        await node.place(SPACE, "l3", may_publish=False, avoid=None)
    assert full.value.reason == "NO_MEDIA_CAPACITY"
    placement = await node.place(SPACE, "host", may_publish=True, avoid=None)
    assert placement.node.node_id == "media-a"


async def test_grants_are_checked_for_user_node_expiry_reuse_and_ended_spaces(
    fleet: Callable[..., asyncio.Future[MediaNode]], apps: AppFactory
) -> None:
    a, b = await fleet("media-a"), await fleet("media-b")
    await a.open_space(SPACE, record=False)
    app = apps("alice")
    offer = await app.offer()

    async def refused(node: MediaNode, user: str, token: str) -> str:
        with pytest.raises((PermissionDenied, FailedPrecondition)) as error:
            await node.negotiate(user, node.name, token, offer)
        return str(error.value.reason)

    assert await refused(a, "mallory", grant("alice", "media-a")) == "GRANT_USER_MISMATCH"
    assert await refused(b, "alice", grant("alice", "media-a")) == "NODE_UNAVAILABLE"
    assert await refused(b, "alice", grant("alice", "media-b", publish=True)) == (
        "NODE_UNAVAILABLE"
    ), "media-b is not the origin: a speaker cannot publish there"
    old = datetime.now().astimezone() - timedelta(minutes=10)
    assert await refused(a, "alice", grant("alice", "media-a", now=old)) == "GRANT_EXPIRED"
    assert await refused(a, "alice", "not-a-grant") == "GRANT_INVALID"
    other_key = grant("alice", "media-a", secret="another-secret-another-secret-0123456789")
    assert await refused(a, "alice", other_key) == "GRANT_INVALID"

    token = grant("alice", "media-a")
    negotiation, record = await a.negotiate("alice", a.name, token, offer)
    assert negotiation.session and not record.record
    assert await refused(a, "alice", token) == "GRANT_ALREADY_USED", "a grant opens one session"

    await a.close_space(SPACE)
    assert await refused(a, "alice", grant("alice", "media-a")) == "SPACE_ENDED"


async def test_permissions_set_through_any_node_reach_the_node_holding_the_session(
    fleet: Callable[..., asyncio.Future[MediaNode]], apps: AppFactory, rooms: RoomsRecorder
) -> None:
    origin, other = await fleet("media-a"), await fleet("media-b")
    await other.open_space(SPACE, record=False)
    speaker = apps("alice", Tone(440, 0.3))
    listener = apps("bob")
    await connect(origin, speaker, "alice", publish=True)
    await connect(origin, listener, "bob")
    assert await eventually(lambda: heard(listener, 440))

    # rooms calls whichever node its channel picked: here the one without the session.
    applied, sessions = await other.update_permissions(
        SPACE,
        "alice",
        ParticipantPermissions(may_publish=True, muted=True, removed=False, revision=2),
    )
    assert applied and sessions == 0
    t0 = time.monotonic()
    assert await eventually(lambda: origin.engine.slot_speakers(SPACE, "bob")[0] is None, 2.0)
    print(f"mute through another node took effect in {(time.monotonic() - t0) * 1000:.0f} ms")
    await asyncio.sleep(0.6)
    assert all(rms < SILENCE_RMS for rms in listener.slots[0].since(t0 + 0.2))

    stale, _ = await other.update_permissions(
        SPACE,
        "alice",
        ParticipantPermissions(may_publish=True, muted=False, removed=False, revision=1),
    )
    assert not stale, "an older revision changes nothing"
    await origin.update_permissions(
        SPACE,
        "alice",
        ParticipantPermissions(may_publish=True, muted=False, removed=False, revision=3),
    )
    assert await eventually(lambda: heard(listener, 440))

    await other.update_permissions(
        SPACE,
        "bob",
        ParticipantPermissions(may_publish=False, muted=False, removed=True, revision=4),
    )
    assert await eventually(lambda: origin.engine.participant_sessions(SPACE, "bob") == 0, 3.0)
    with pytest.raises(PermissionDenied) as removed:
        await connect(origin, apps("bob-again"), "bob")
    assert removed.value.reason == "PARTICIPANT_REMOVED", "a removed participant cannot return"

    def states() -> list[tuple[str, bool]]:
        return [(c.participant, c.connected) for c in rooms.changes]

    assert await eventually(lambda: ("bob", False) in states(), 2.0), "rooms hears of the close"
    assert ("alice", True) in states() and ("bob", True) in states()
    assert any(
        space == SPACE and any(level.participant == "alice" for level in levels)
        for space, levels in rooms.levels
    )


async def test_a_dead_node_s_participants_are_moved_and_its_spaces_get_a_new_origin(
    fleet: Callable[..., asyncio.Future[MediaNode]], apps: AppFactory, rooms: RoomsRecorder
) -> None:
    survivor, doomed = await fleet("media-a", capacity=10), await fleet("media-b", capacity=1000)
    await survivor.open_space(SPACE, record=False)
    # Make the doomed node the origin (the survivor is busier).
    await survivor.registry.claim_origin(SPACE, "media-b", replacing="media-a")
    await connect(doomed, apps("alice", Tone(440, 0.3)), "alice", publish=True)
    await connect(doomed, apps("bob"), "bob")
    assert await eventually(lambda: len(rooms.changes) >= 2, 3.0)

    # A crash: the node stops reporting and forwarding, and never deregisters.
    t0 = time.monotonic()
    for task in doomed._tasks:
        task.cancel()
    doomed.engine.on_session_state = None  # a dead process updates nothing on its way out
    await doomed.engine.close()

    assert await eventually(lambda: any(r[3] == "media-b" for r in rooms.reconnects), 8.0)
    print(f"dead node noticed and its participants moved after {time.monotonic() - t0:.1f} s")
    space, moved, draining, source = next(r for r in rooms.reconnects if r[3] == "media-b")
    assert (space, sorted(moved), draining) == (SPACE, ["alice", "bob"], False)
    placement = await survivor.place(SPACE, "alice", may_publish=True, avoid="media-b")
    assert placement.node.node_id == "media-a", "the space moved to the survivor"
    live, dead = await survivor.registry.nodes()
    assert [n.node_id for n in live] == ["media-a"] and dead == []


async def test_a_draining_node_takes_no_one_and_asks_rooms_to_move_its_participants(
    fleet: Callable[..., asyncio.Future[MediaNode]], apps: AppFactory, rooms: RoomsRecorder
) -> None:
    draining, spare = await fleet("media-a"), await fleet("media-b")
    await draining.open_space(SPACE, record=False)
    listener = apps("bob")
    await connect(draining, listener, "bob")

    await draining.drain(grace_s=2.0)
    stats = await spare.registry.node("media-a")
    assert stats is not None and stats.draining and stats.drain_deadline is not None
    assert await eventually(lambda: "bob" in sum((r[1] for r in rooms.reconnects), []), 3.0)
    assert all(r[2] for r in rooms.reconnects), "the reason is a drain"
    placement = await spare.place(SPACE, "carol", may_publish=False, avoid=None)
    assert placement.node.node_id == "media-b", "the space moved off the draining node"
    with pytest.raises(FailedPrecondition) as refused:
        await connect(draining, apps("dave"), "dave")
    assert refused.value.reason == "NODE_UNAVAILABLE"

    await listener.close()  # the app moved away: the drain ends before its deadline
    t0 = time.monotonic()
    await draining.wait_drained()
    assert time.monotonic() - t0 < 2.5


async def test_a_recorded_space_becomes_one_playable_ogg_opus_file_of_its_speakers(
    fleet: Callable[..., asyncio.Future[MediaNode]],
    apps: AppFactory,
    redis_client: redis.asyncio.Redis,
) -> None:
    node = await fleet("media-a")
    await node.open_space(SPACE, record=True)
    listener = apps("bob")
    await connect(node, apps("alice", Tone(440, 0.3)), "alice", publish=True)
    await connect(node, listener, "bob")
    assert await eventually(lambda: heard(listener, 440))
    listed = await node.registry.recordings(SPACE)
    assert [item["state"] for item in listed] == [media_res.Recording.STATE_RECORDING]
    await asyncio.sleep(2.0)

    await node.close_space(SPACE)
    (item,) = await node.registry.recordings(SPACE)
    assert item["state"] == media_res.Recording.STATE_READY, item
    assert item["duration_s"] >= 2.0 and item["size_bytes"] > 1000
    assert item["expire_time"] - item["ready_time"] == pytest.approx(30 * 86400)

    path = node.options.recordings_dir / SPACE / f"{item['id']}.ogg"  # type: ignore[operator]
    with av.open(str(path)) as played:
        stream = played.streams.audio[0]
        assert stream.codec_context.name == "opus"
        pcm = np.concatenate(
            [frame.to_ndarray().reshape(-1) for frame in played.decode(stream)]
        ).astype(np.float64)
    assert len(pcm) / 48000 == pytest.approx(item["duration_s"], abs=0.1)
    loud = pcm[np.abs(pcm) > 0.05]
    assert len(loud) > 48000, "over a second of the speaker's tone"
    tail = pcm[-48000:]
    spectrum = np.abs(np.fft.rfft(tail * np.hanning(len(tail))))
    assert abs(np.argmax(spectrum) * 48000 / len(tail) - 440) < 5, "the tone, mixed once"

    entries = await redis_client.xrange("spaces:events:media")
    (entry_id, fields), *_ = entries
    assert fields[b"type"] == b"recording.ready"
    event = media_events.RecordingReadyEvent.FromString(fields[b"data"])
    assert event.recording.name == f"spaces/{SPACE}/recordings/{item['id']}"
    assert event.recording.state == media_res.Recording.STATE_READY


def spoken(text: str, tmp_path: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng, as 48 kHz 16-bit mono samples."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is missing: apt install espeak-ng (.ci/run installs it)")
    wav = tmp_path / "speech.wav"
    subprocess.run([espeak, "-s", "140", "-w", str(wav), text], check=True)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
    with av.open(str(wav)) as source:
        chunks = [
            out.to_ndarray().reshape(-1)
            for frame in source.decode(audio=0)
            for out in resampler.resample(frame)
        ]
    return np.concatenate(chunks)


async def test_live_captions_recognize_a_speaker_and_reach_rooms(
    fleet: Callable[..., asyncio.Future[MediaNode]],
    apps: AppFactory,
    rooms: RoomsRecorder,
    tmp_path: Path,
) -> None:
    speech = spoken("hello everyone welcome to the space today we talk about music", tmp_path)
    node = await fleet("media-a", captions=True)
    await node.open_space(SPACE, record=False)
    await connect(node, apps("alice", Speech(speech, lead_silence_s=1.0)), "alice", publish=True)
    await connect(node, apps("bob"), "bob")

    def final_text() -> str:
        return " ".join(s.text for _, s in rooms.captions if s.final)

    # Recognition runs behind real time on a busy machine: allow it time.
    assert await eventually(lambda: bool(final_text()), timeout=60.0), rooms.captions
    words = set(final_text().split())
    print(f"captions: {final_text()!r}")
    assert words & {"hello", "everyone", "welcome", "space", "talk", "music", "today"}, words
    segment = next(s for _, s in rooms.captions if s.final)
    assert segment.participant == "alice" and segment.end_offset_s >= segment.start_offset_s


async def test_a_crowd_negotiating_at_once_is_told_to_retry_and_keeps_its_grants(
    fleet: Callable[..., asyncio.Future[MediaNode]], apps: AppFactory
) -> None:
    node = await fleet("media-a", negotiations=2)
    await node.open_space(SPACE, record=False)
    crowd = [apps(f"u{i}") for i in range(6)]
    offers = [await app.offer() for app in crowd]
    grants = [grant(f"u{i}", "media-a") for i in range(6)]
    results = await asyncio.gather(
        *(node.negotiate(f"u{i}", node.name, grants[i], offers[i]) for i in range(6)),
        return_exceptions=True,
    )
    busy = [i for i, r in enumerate(results) if isinstance(r, ResourceExhausted)]
    assert busy, "more than 2 at once are refused"
    assert all(results[i].reason == "NEGOTIATIONS_BUSY" for i in busy)  # type: ignore[union-attr]
    assert all(not isinstance(r, Exception) or i in busy for i, r in enumerate(results))
    retried = await node.negotiate(f"u{busy[0]}", node.name, grants[busy[0]], offers[busy[0]])
    assert retried[0].session, "a refused app retries with the same grant"


async def test_listeners_beyond_a_full_origin_hear_the_space_through_an_edge_relay(
    fleet: Callable[..., asyncio.Future[MediaNode]], apps: AppFactory
) -> None:
    origin = await fleet("media-a", capacity=2)
    edge = await fleet("media-b", capacity=100)
    assert await origin.open_space(SPACE, record=False) == "media-a"
    alice = apps("alice", Tone(440, 0.3))
    await connect(origin, alice, "alice", publish=True)
    assert (await origin.place(SPACE, "bob", may_publish=False, avoid=None)).origin
    await connect(origin, apps("bob"), "bob")

    await origin.registry.report(origin.info())  # the origin is full now
    placement = await edge.place(SPACE, "carol", may_publish=False, avoid=None)
    assert (placement.node.node_id, placement.origin) == ("media-b", False)
    carol = apps("carol")
    await connect(edge, carol, "carol")
    assert await eventually(lambda: heard(carol, 440), 15.0), "the edge relays the speaker"
    assert edge.info().relays >= 1 and origin.info().relays >= 1

    placement = await edge.place(SPACE, "dave", may_publish=True, avoid=None)
    assert placement.node.node_id == "media-a", "publishers always go to the origin"
    with pytest.raises(FailedPrecondition) as speaker_on_edge:
        await connect(edge, apps("erin", Tone(660, 0.3)), "erin", publish=True)
    assert speaker_on_edge.value.reason == "NODE_UNAVAILABLE"

    await origin.close_space(SPACE)
    assert await eventually(lambda: edge.engine.participant_count(SPACE) == 0, 5.0)
    assert not edge.info().relays, "the edge let go of the relay"
