"""The live event log and fan-out against real PostgreSQL and Valkey: one total order per
Space across replicas, nothing lost (publishes, restarts), resumes without gaps or
duplicates, coalescing, and slow watchers."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import redis.asyncio
from spaces.rooms.v1 import rooms_events_pb2, rooms_resources_pb2

from services.common.errors import InvalidArgument, Unavailable
from services.rooms.live import stream_key
from tests.integration.rooms_live.conftest import (
    SPACE,
    ReplicaFactory,
    SpaceEvent,
    Watcher,
    ended,
    fast_settings,
    joined,
    snapshot_of,
)


def seqs(events: list[SpaceEvent]) -> list[int]:
    return [e.sequence for e in events]


def users(events: list[SpaceEvent]) -> list[str]:
    return [e.participant_joined.participant.user for e in events]


async def test_two_replicas_give_every_watcher_one_gap_free_order(
    new_replica: ReplicaFactory,
) -> None:
    a, b = await new_replica(), await new_replica()
    wa = Watcher(a.hub.watch(SPACE, "", snapshot_of))
    wb = Watcher(b.hub.watch(SPACE, "", snapshot_of))
    await wa.wait_count(1)
    await wb.wait_count(1)

    async def writer(replica_index: int, worker: int) -> None:
        replica = (a, b)[replica_index]
        for i in range(25):
            await replica.append(SPACE, joined(replica_index * 1000 + worker * 100 + i))

    # Eight concurrent writers, four per replica, racing for the same Space.
    await asyncio.gather(*(writer(r, w) for r in (0, 1) for w in range(4)))
    await wa.wait_count(201)
    await wb.wait_count(201)

    assert seqs(wa.live()) == list(range(1, 201))
    assert [e.SerializeToString() for e in wa.live()] == [e.SerializeToString() for e in wb.live()]
    assert sorted(users(wa.live())) == sorted(
        f"users/u{r * 1000 + w * 100 + i}" for r in (0, 1) for w in range(4) for i in range(25)
    )
    # Batching: fewer messages than events.
    assert wa.responses < len(wa.events)
    await wa.close()
    await wb.close()


async def test_lost_publishes_are_recovered_from_postgres(new_replica: ReplicaFactory) -> None:
    watching = await new_replica()
    # A replica that commits but never publishes (as if it died right after each commit).
    mute = await new_replica(started=False)
    watcher = Watcher(watching.hub.watch(SPACE, "", snapshot_of))
    await watcher.wait_count(1)

    await mute.append(SPACE, joined(1))  # lost, then followed by a published event
    await watching.append(SPACE, joined(2))
    await watcher.wait_count(3)
    await mute.append(SPACE, joined(3))  # lost and last: only the periodic check finds it
    await watcher.wait_count(4, timeout=5)

    assert seqs(watcher.live()) == [1, 2, 3]
    assert users(watcher.live()) == ["users/u1", "users/u2", "users/u3"]
    await watcher.close()


async def test_rolled_back_events_are_never_delivered(new_replica: ReplicaFactory) -> None:
    replica = await new_replica()
    watcher = Watcher(replica.hub.watch(SPACE, "", snapshot_of))
    await watcher.wait_count(1)

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with replica.pool.connection() as conn, conn.transaction():
            await replica.log.append(conn, SPACE, joined(666))
            raise Abort
    await replica.append(SPACE, joined(1))
    await watcher.wait_count(2)
    await asyncio.sleep(0.5)  # past a periodic check

    assert users(watcher.live()) == ["users/u1"]
    assert seqs(watcher.live()) == [1]  # the rolled-back number was reused, no hole
    await watcher.close()


async def test_resume_misses_nothing_and_duplicates_nothing(new_replica: ReplicaFactory) -> None:
    a, b = await new_replica(), await new_replica()
    first = Watcher(a.hub.watch(SPACE, "", snapshot_of))
    await first.wait_count(1)
    for n in range(1, 6):
        await a.append(SPACE, joined(n))
    await a.log.add_reaction(SPACE, "u1", rooms_resources_pb2.EMOJI_FIRE)
    await first.wait_for(lambda w: any(e.HasField("reactions") for e in w.events))
    token = first.live()[2].resume_token  # after event 3
    await first.close()

    # Disconnected: more happens, then the client comes back on the other replica.
    for n in range(6, 9):
        await b.append(SPACE, joined(n))
    resumed = Watcher(b.hub.watch(SPACE, token, snapshot_of))
    await resumed.wait_count(5)  # 4..8, without the reaction (ephemeral, not replayed)
    await a.append(SPACE, joined(9))
    await resumed.wait_count(6)

    assert users(resumed.events) == [f"users/u{n}" for n in range(4, 10)]
    assert seqs(resumed.events) == [4, 5, 7, 8, 9, 10]  # 6 was the reaction
    assert not any(e.HasField("snapshot") for e in resumed.events)
    await resumed.close()


async def test_token_older_than_retention_yields_a_snapshot(new_replica: ReplicaFactory) -> None:
    replica = await new_replica()
    for n in range(1, 4):
        await replica.append(SPACE, joined(n))
    old = await replica.append(SPACE, joined(4))
    token = replica.log.tokens.encode(SPACE, old - 2)
    async with replica.pool.connection() as conn:
        await conn.execute(
            "UPDATE space_events SET event_time = event_time - %s WHERE seq <= %s",
            (timedelta(hours=1), old - 1),
        )
    assert await replica.log.prune() == 3

    watcher = Watcher(replica.hub.watch(SPACE, token, snapshot_of))
    await watcher.wait_count(1)
    snapshot = watcher.events[0]
    assert snapshot.HasField("snapshot")
    assert snapshot.sequence == old
    await replica.append(SPACE, joined(5))
    await watcher.wait_count(2)
    assert seqs(watcher.live()) == [old + 1]

    # A token after the pruned part still resumes normally.
    resumed = Watcher(replica.hub.watch(SPACE, snapshot.resume_token, snapshot_of))
    await resumed.wait_count(1)
    assert users(resumed.events) == ["users/u5"]
    await watcher.close()
    await resumed.close()


async def test_restart_of_every_replica_keeps_the_sequence(
    new_replica: ReplicaFactory, redis_client: redis.asyncio.Redis
) -> None:
    before = await new_replica()
    watcher = Watcher(before.hub.watch(SPACE, "", snapshot_of))
    await watcher.wait_count(1)
    for n in range(1, 4):
        await before.append(SPACE, joined(n))
    await watcher.wait_count(4)
    token = watcher.events[-1].resume_token
    await watcher.close()
    await before.close()
    # Every process is gone, and so is the Redis stream: only PostgreSQL remembers.
    await redis_client.delete(stream_key(SPACE))
    after = await new_replica()

    assert await after.append(SPACE, joined(4)) == 4
    resumed = Watcher(after.hub.watch(SPACE, token, snapshot_of))
    await resumed.wait_count(1)
    await after.append(SPACE, joined(5))
    await resumed.wait_count(2)
    assert seqs(resumed.events) == [4, 5]
    assert users(resumed.events) == ["users/u4", "users/u5"]
    await resumed.close()


async def test_reactions_and_speaking_levels_are_coalesced(new_replica: ReplicaFactory) -> None:
    a, b = await new_replica(), await new_replica()
    watcher = Watcher(a.hub.watch(SPACE, "", snapshot_of))
    await watcher.wait_count(1)
    emojis = [rooms_resources_pb2.EMOJI_FIRE, rooms_resources_pb2.EMOJI_CLAP]
    for i in range(1000):
        # Half through each replica, spread over about 0.25 s.
        await (a, b)[i % 2].log.add_reaction(SPACE, f"u{i}", emojis[i % 3 == 0])
        if i % 100 == 99:
            await asyncio.sleep(0.025)
    for i in range(100):
        level = rooms_resources_pb2.SpeakingLevel(
            participant=f"spaces/{SPACE}/participants/p1", level=i / 100, speaking=True
        )
        await a.log.add_speaking_levels(SPACE, [level])
    await a.log.stop()
    await b.log.stop()

    def totals(w: Watcher) -> dict[int, int]:
        counts: dict[int, int] = {}
        for event in w.events:
            for count in event.reactions.counts:
                counts[count.emoji] = counts.get(count.emoji, 0) + count.count
        return counts

    await watcher.wait_for(lambda w: sum(totals(w).values()) == 1000)
    await watcher.wait_for(
        lambda w: any(
            abs(e.speaking_levels.levels[0].level - 0.99) < 1e-6
            for e in w.events
            if e.HasField("speaking_levels")
        )
    )
    reactions = [e for e in watcher.events if e.HasField("reactions")]
    levels = [e for e in watcher.events if e.HasField("speaking_levels")]
    assert totals(watcher) == {
        rooms_resources_pb2.EMOJI_FIRE: 666,
        rooms_resources_pb2.EMOJI_CLAP: 334,
    }
    assert len(reactions) <= 12  # two replicas, ~0.25 s of 0.1 s windows, plus the flush
    assert all(r.reactions.counts[0].count >= r.reactions.counts[-1].count for r in reactions)
    assert len(levels) <= 3
    await watcher.close()


async def test_slow_watcher_is_cut_off_and_resumes(new_replica: ReplicaFactory) -> None:
    replica = await new_replica(settings=fast_settings(watcher_max_lag=10))
    stream = replica.hub.watch(SPACE, "", snapshot_of)
    first = await anext(stream)
    assert first.events[0].HasField("snapshot")
    token = first.events[0].resume_token
    keeping_up = Watcher(replica.hub.watch(SPACE, "", snapshot_of))
    await keeping_up.wait_count(1)

    for n in range(1, 31):  # the slow watcher reads nothing meanwhile
        await replica.append(SPACE, joined(n))
    await keeping_up.wait_count(31)
    with pytest.raises(Unavailable) as raised:
        await anext(stream)
    assert raised.value.reason == "WATCHER_TOO_SLOW"

    resumed = Watcher(replica.hub.watch(SPACE, token, snapshot_of))
    await resumed.wait_count(30)
    assert seqs(resumed.events) == list(range(1, 31))
    await resumed.close()
    await keeping_up.close()


async def test_filters_and_the_end_of_a_space(new_replica: ReplicaFactory) -> None:
    replica = await new_replica()

    def no_captions(event: SpaceEvent) -> bool:
        return not event.HasField("caption_segment")

    filtered = Watcher(replica.hub.watch(SPACE, "", snapshot_of, participant_filter=no_captions))
    everything = Watcher(replica.hub.watch(SPACE, "", snapshot_of))
    await filtered.wait_count(1)
    await everything.wait_count(1)
    caption = SpaceEvent(caption_segment=rooms_events_pb2.SpaceEvent().caption_segment)
    caption.caption_segment.SetInParent()
    await replica.append(SPACE, joined(1))
    await replica.append(SPACE, caption)
    await replica.append(SPACE, ended())
    await asyncio.wait_for(everything.task, 5)
    await asyncio.wait_for(filtered.task, 5)  # both streams end after space_ended

    assert [e.WhichOneof("event") for e in everything.live()] == [
        "participant_joined",
        "caption_segment",
        "space_ended",
    ]
    assert [e.WhichOneof("event") for e in filtered.live()] == [
        "participant_joined",
        "space_ended",
    ]
    assert replica.hub.watchers == 0

    # Watching an ended Space: its snapshot says so and the replay ends at space_ended.
    late = Watcher(replica.hub.watch(SPACE, filtered.events[0].resume_token, snapshot_of))
    await asyncio.wait_for(late.task, 5)
    assert [e.WhichOneof("event") for e in late.events][-1] == "space_ended"


async def test_bad_tokens_are_refused(new_replica: ReplicaFactory) -> None:
    replica = await new_replica()
    other_space = replica.log.tokens.encode("space-2", 1)
    for token in ("not a token", "AAAA", other_space):
        with pytest.raises(InvalidArgument) as raised:
            await anext(replica.hub.watch(SPACE, token, snapshot_of))
        assert raised.value.reason == "RESUME_TOKEN_INVALID"
    assert replica.hub.watchers == 0


async def test_many_watchers_arriving_at_once_share_one_feed(new_replica: ReplicaFactory) -> None:
    replica = await new_replica()
    watchers = [Watcher(replica.hub.watch(SPACE, "", snapshot_of)) for _ in range(50)]
    for watcher in watchers:
        await watcher.wait_count(1)
    assert replica.hub.watched_spaces == 1
    assert replica.hub.watchers == 50
    await replica.append(SPACE, joined(1))
    for watcher in watchers:
        await watcher.wait_count(2)
        assert seqs(watcher.live()) == [1]
    for watcher in watchers:
        await watcher.close()
    assert replica.hub.watched_spaces == 0


async def test_stopping_a_hub_ends_its_streams_resumably(new_replica: ReplicaFactory) -> None:
    replica = await new_replica()
    watcher = Watcher(replica.hub.watch(SPACE, "", snapshot_of))
    await watcher.wait_count(1)
    await replica.hub.stop()
    await asyncio.wait_for(watcher.task, 5)
    assert isinstance(watcher.error, Unavailable)
    assert watcher.error.reason == "WATCH_INTERRUPTED"
