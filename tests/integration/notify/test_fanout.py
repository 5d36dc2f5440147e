"""Follower fan-out: crash safety (SIGKILL mid-way), filters, exactly-once, fairness."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from google.protobuf import field_mask_pb2
from prometheus_client import REGISTRY
from spaces.identity.v1 import identity_events_pb2 as identity_events
from spaces.notify.v1 import notify_resources_pb2 as res
from spaces.notify.v1 import notify_service_pb2 as pb
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_pb

from tests.integration.identity.harness import Identity, follow
from tests.integration.notify.harness import (
    Notify,
    NotifyProcess,
    eventually,
    notify_sql,
    process_env,
    publish,
    seed_followers,
)

K = res.NotificationKind


def started(
    space: str, host: str, visibility: int = rooms_pb.SPACE_VISIBILITY_EVERYONE
) -> rooms_events.SpaceStartedEvent:
    return rooms_events.SpaceStartedEvent(
        space_id=space,
        host_id=host,
        title="Live jazz",
        visibility=visibility,  # type: ignore[arg-type]
    )


async def test_sigkill_mid_fanout_then_restart_notifies_everyone_once(
    database_url: str, redis_url: str, identity: Identity, tmp_path: Path
) -> None:
    (host,) = await identity.bulk_users(1, prefix="host")
    followers = seed_followers(database_url, host, 10_000)
    env = process_env(
        database_url,
        redis_url,
        identity,
        NOTIFY_CONSUMER_NAME="notify-crash",
        NOTIFY_FANOUT_BATCH_SIZE="250",
        # Slow enough to be killed part-way: 40 batches, ~2 s in all.
        NOTIFY_FANOUT_BATCH_PAUSE_S="0.05",
    )
    process = NotifyProcess(env, tmp_path / "notify.log")
    await process.start()
    try:
        await publish(redis_url, "rooms", started("crash", host), event_type="space.started")

        def progress() -> int:
            rows = notify_sql(
                database_url,
                "SELECT count(*) FROM notifications WHERE dedupe_key = 'started:crash'",
            )
            return int(rows[0][0])

        async def halfway() -> bool:
            return progress() >= 2_000

        await eventually(halfway, timeout=30, interval=0.01)
        process.kill()
        before = progress()
        assert 0 < before < 10_000, before
        job = notify_sql(database_url, "SELECT state, cursor FROM fanout_jobs")
        assert job[0][0] == 1 and job[0][1] != ""

        await process.start()

        async def finished() -> bool:
            rows = notify_sql(database_url, "SELECT state FROM fanout_jobs")
            return rows[0][0] == 2

        await eventually(finished, timeout=40, interval=0.05)
    finally:
        process.stop()
    rows = notify_sql(
        database_url,
        "SELECT user_id, count(*) FROM notifications WHERE dedupe_key = 'started:crash'"
        " GROUP BY user_id",
    )
    counts = dict(rows)
    assert set(counts) == set(followers)
    assert set(counts.values()) == {1}


async def test_muted_blocked_and_kind_off_get_nothing(
    notify: Notify, identity: Identity, redis_url: str
) -> None:
    host, plain, muted, kind_off, blocked_by_event = await identity.bulk_users(5)
    for fan in (plain, muted, kind_off, blocked_by_event):
        await follow(identity, fan, host)
    await notify.stub.UpdateNotificationPreferences(
        pb.UpdateNotificationPreferencesRequest(
            preferences=res.NotificationPreferences(
                name="users/me/notificationPreferences", muted_actors=[f"users/{host}"]
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["muted_actors"]),
        ),
        metadata=identity.token_for(muted),
    )
    await notify.stub.UpdateNotificationPreferences(
        pb.UpdateNotificationPreferencesRequest(
            preferences=res.NotificationPreferences(
                name="users/me/notificationPreferences",
                disabled_kinds=[K.NOTIFICATION_KIND_SPACE_STARTED],
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["disabled_kinds"]),
        ),
        metadata=identity.token_for(kind_off),
    )
    # A block notify hears of while the follow still exists (events race in real life).
    await publish(
        redis_url,
        "identity",
        identity_events.UserBlockedEvent(blocker_id=blocked_by_event, blocked_id=host),
    )

    async def mirrored() -> bool:
        return bool(
            await notify.sql("SELECT 1 FROM blocks WHERE blocker_id = %s", blocked_by_event)
        )

    await eventually(mirrored)
    await publish(redis_url, "rooms", started("filters", host))

    async def done() -> bool:
        rows = await notify.sql("SELECT state FROM fanout_jobs")
        return bool(rows) and rows[0][0] == 2

    await eventually(done)
    rows = await notify.sql("SELECT user_id, title, actor FROM notifications")
    assert [r[0] for r in rows] == [plain]
    assert rows[0][2] == f"users/{host}" and rows[0][1].endswith("is hosting")


async def test_followed_by_host_and_invited_only_visibility(
    notify: Notify, identity: Identity, redis_url: str
) -> None:
    host, friend, stranger = await identity.bulk_users(3)
    await follow(identity, friend, host)
    await follow(identity, stranger, host)
    await follow(identity, host, friend)
    await publish(
        redis_url, "rooms", started("circle", host, rooms_pb.SPACE_VISIBILITY_FOLLOWED_BY_HOST)
    )
    await publish(
        redis_url, "rooms", started("secret", host, rooms_pb.SPACE_VISIBILITY_INVITED_ONLY)
    )

    async def done() -> bool:
        rows = await notify.sql("SELECT count(*) FROM fanout_jobs WHERE state = 2")
        return rows[0][0] == 1

    await eventually(done)
    await asyncio.sleep(0.3)
    rows = await notify.sql("SELECT user_id, space FROM notifications")
    assert rows == [(friend, "spaces/circle")]


async def test_duplicated_stream_delivery_is_exactly_once(
    start_notify: Callable[..., AbstractAsyncContextManager[Notify]],
    identity: Identity,
    redis_url: str,
    database_url: str,
) -> None:
    """The same events appended twice and read by two replicas: one effect each."""
    host, fan = await identity.bulk_users(2)
    followers = seed_followers(database_url, host, 300)
    event_ids = [uuid.uuid4(), uuid.uuid4()]
    async with start_notify(consumer_name="a", fanout_batch_size=50) as first:
        async with start_notify(consumer_name="b", fanout_batch_size=50):
            for _ in range(2):
                await publish(redis_url, "rooms", started("dup", host), event_id=event_ids[0])
                await publish(
                    redis_url,
                    "rooms",
                    rooms_events.SpeakInvitationEvent(
                        space_id="dup", invitee_id=fan, inviter_id=host
                    ),
                    event_id=event_ids[1],
                )

            async def done() -> bool:
                rows = await first.sql("SELECT state FROM fanout_jobs")
                return bool(rows) and all(r[0] == 2 for r in rows)

            await eventually(done)
            await asyncio.sleep(0.3)
            jobs = await first.sql("SELECT count(*) FROM fanout_jobs")
            assert jobs[0][0] == 1
            counts = dict(
                await first.sql(
                    "SELECT user_id, count(*) FROM notifications WHERE kind = 1 GROUP BY user_id"
                )
            )
            assert set(counts) == set(followers) and set(counts.values()) == {1}
            invitations = await first.sql("SELECT count(*) FROM notifications WHERE kind = 8")
            assert invitations[0][0] == 1


async def test_big_fanout_does_not_hold_up_other_notifications(
    start_notify: Callable[..., AbstractAsyncContextManager[Notify]],
    identity: Identity,
    redis_url: str,
    database_url: str,
) -> None:
    host, star, fan = await identity.bulk_users(3)
    seed_followers(database_url, star, 3_000)
    async with start_notify(fanout_batch_size=100, fanout_batch_pause_s=0.05) as notify:
        await publish(redis_url, "rooms", started("big", star))

        async def running() -> bool:
            rows = await notify.sql("SELECT batches FROM fanout_jobs")
            return bool(rows) and rows[0][0] >= 2

        await eventually(running)
        await publish(
            redis_url,
            "rooms",
            rooms_events.SpeakInvitationEvent(space_id="small", invitee_id=fan, inviter_id=host),
        )

        async def arrived() -> bool:
            rows = await notify.sql("SELECT 1 FROM notifications WHERE user_id = %s", fan)
            return bool(rows)

        await eventually(arrived)
        # Not queued behind it: the invitation arrived while the fan-out is still running
        # (how fast is the bench's business, not a test's).
        state = await notify.sql("SELECT state FROM fanout_jobs")
        assert state[0][0] == 1, "the big fan-out should still be running"


async def test_a_replayed_batch_creates_nothing_twice(notify: Notify) -> None:
    """A crash between a batch's commit and its cursor update replays the batch: the
    unique index turns the replay (and any overlap) into nothing, and a job whose lease was
    taken over is left alone."""
    store = notify.runtime.store
    assert store is not None
    job_id = uuid.uuid4()
    await notify.sql(
        """INSERT INTO fanout_jobs (id, kind, host_id, space_id, title, visibility, dedupe_key,
                                    lease_owner, lease_until)
           VALUES (%s, 1, 'host', 'replay', 'Host is hosting', 1, 'started:replay', 'w',
                   now() + interval '1 minute')""",
        job_id,
    )
    job = await store.claim_fanout_job("w", 60.0)
    assert job is not None and job.id == job_id
    ids = [f"fan{i:04d}" for i in range(150)]
    assert await store.write_fanout_rows(job, "w", ids[:100]) == 100
    assert await store.write_fanout_rows(job, "w", ids[:100]) == 0
    assert await store.write_fanout_rows(job, "w", ids[50:]) == 50
    counts = await notify.sql(
        "SELECT count(*), count(DISTINCT user_id) FROM notifications"
        " WHERE dedupe_key = 'started:replay'"
    )
    assert counts == [(150, 150)]
    assert await store.advance_fanout_cursor(job_id, "w", "", "c1", 150, 60.0)
    # The cursor moved on: a stale writer's cursor update is refused.
    assert not await store.advance_fanout_cursor(job_id, "w", "", "c1", 0, 60.0)
    await notify.sql("UPDATE fanout_jobs SET lease_owner = 'someone-else'")
    assert await store.write_fanout_rows(job, "w", ["late"]) is None
    assert not await store.advance_fanout_cursor(job_id, "w", "c1", "c2", 1, 60.0)


async def test_a_fanout_for_a_host_that_no_longer_exists_is_finished(
    notify: Notify, redis_url: str
) -> None:
    await publish(redis_url, "rooms", started("orphan", "no-such-host"))

    async def finished() -> bool:
        rows = await notify.sql("SELECT state, created FROM fanout_jobs")
        return rows == [(2, 0)]

    await eventually(finished)


async def test_fanout_metrics(
    start_notify: Callable[..., AbstractAsyncContextManager[Notify]],
    identity: Identity,
    redis_url: str,
    database_url: str,
) -> None:
    (host,) = await identity.bulk_users(1)
    seed_followers(database_url, host, 300)

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    created_before = sample("spaces_notify_notifications_created_total", source="fanout")
    finished_before = sample("spaces_notify_fanout_duration_seconds_count")
    batches_before = sample("spaces_notify_fanout_batch_seconds_count")
    async with start_notify(fanout_batch_size=100) as notify:
        await publish(redis_url, "rooms", started("measured", host))

        async def done() -> bool:
            rows = await notify.sql("SELECT state FROM fanout_jobs")
            return rows == [(2,)]

        await eventually(done)

        async def idle() -> bool:
            return (
                sample("spaces_notify_fanout_pending_jobs") == 0
                and sample("spaces_notify_fanout_lag_seconds") == 0
            )

        await eventually(idle)
    assert sample("spaces_notify_notifications_created_total", source="fanout") == (
        created_before + 300
    )
    assert sample("spaces_notify_fanout_duration_seconds_count") == finished_before + 1
    assert sample("spaces_notify_fanout_batch_seconds_count") == batches_before + 3
