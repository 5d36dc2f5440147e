"""Reminders: durable, on time, once, across a restart and with several replicas; they move
with a reschedule and disappear with a cancellation."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import pytest
from spaces.notify.v1 import notify_resources_pb2 as res
from spaces.notify.v1 import notify_service_pb2 as pb
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events

from tests.integration.identity.harness import Identity, reason
from tests.integration.notify.harness import (
    Notify,
    NotifyProcess,
    eventually,
    notify_sql,
    process_env,
    publish,
    stamp,
)

Start = Callable[..., AbstractAsyncContextManager[Notify]]


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def test_reminder_fires_once_on_time_across_a_restart(
    start_notify: Start, identity: Identity, database_url: str
) -> None:
    host, fan = await identity.bulk_users(2)
    fire = now() + dt.timedelta(seconds=3)
    async with start_notify() as notify:
        scheduled = await notify.stub.ScheduleReminder(
            pb.ScheduleReminderRequest(
                space="spaces/sp",
                user=f"users/{fan}",
                kind=res.REMINDER_KIND_SUBSCRIBER,
                fire_time=stamp(fire),
            ),
            metadata=notify.service_metadata,
        )
        assert scheduled.reminder.state == res.ScheduledReminder.STATE_SCHEDULED
    # Down while nothing is due; two replicas come back before the fire time.
    async with start_notify(consumer_name="r1") as one, start_notify(consumer_name="r2"):

        async def sent() -> bool:
            rows = await one.sql("SELECT state FROM reminders")
            return rows[0][0] == 2

        await eventually(sent, timeout=10, interval=0.02)
        await asyncio.sleep(0.5)
        # Never early; how late is bench/notify_fanout.py's reminder_lateness_s (and the
        # spaces_notify_reminder_lateness_seconds histogram), not a wall-clock assertion.
        rows = await one.sql("SELECT sent_time >= fire_time FROM reminders")
        assert rows == [(True,)]
        inbox = await one.sql("SELECT kind, space FROM notifications WHERE user_id = %s", fan)
        assert inbox == [(res.NOTIFICATION_KIND_SPACE_REMINDER, "spaces/sp")]
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await one.stub.CancelReminder(
                pb.CancelReminderRequest(space="spaces/sp", user=f"users/{fan}"),
                metadata=one.service_metadata,
            )
        assert reason(late.value) == "REMINDER_ALREADY_SENT"


async def test_reminders_move_with_reschedule_and_vanish_on_cancel(
    notify: Notify, identity: Identity, redis_url: str
) -> None:
    host, fan, other = await identity.bulk_users(3)
    start = now() + dt.timedelta(minutes=30)
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpaceScheduledEvent(
            space_id="sched", host_id=host, title="Later", scheduled_start_time=stamp(start)
        ),
    )
    await publish(
        redis_url,
        "rooms",
        rooms_events.ReminderSetEvent(
            space_id="sched", user_id=fan, scheduled_start_time=stamp(start)
        ),
    )

    async def both() -> bool:
        rows = await notify.sql("SELECT count(*) FROM reminders WHERE state = 1")
        return rows[0][0] == 2

    await eventually(both)
    fires = dict(await notify.sql("SELECT user_id, fire_time FROM reminders"))
    assert fires[host] == start.replace(microsecond=fires[host].microsecond)
    assert abs((start - dt.timedelta(minutes=10) - fires[fan]).total_seconds()) < 0.01

    # Rescheduled to start in 2 s: the host's reminder moves to then; the subscriber's lead
    # is already past, so theirs fires at once.
    new_start = now() + dt.timedelta(seconds=2)
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpaceRescheduledEvent(
            space_id="sched",
            host_id=host,
            old_scheduled_start_time=stamp(start),
            new_scheduled_start_time=stamp(new_start),
        ),
    )

    async def fan_reminded() -> bool:
        rows = await notify.sql("SELECT 1 FROM notifications WHERE user_id = %s AND kind = 3", fan)
        return bool(rows)

    await eventually(fan_reminded, timeout=5)
    moved = await notify.sql("SELECT kind FROM notifications WHERE user_id = %s", fan)
    assert sorted(k for (k,) in moved) == [
        res.NOTIFICATION_KIND_SPACE_REMINDER,
        res.NOTIFICATION_KIND_SPACE_RESCHEDULED,
    ]

    async def host_reminded() -> bool:
        rows = await notify.sql("SELECT sent_time FROM reminders WHERE user_id = %s", host)
        return rows[0][0] is not None

    await eventually(host_reminded, timeout=5, interval=0.02)
    sent = (await notify.sql("SELECT sent_time FROM reminders WHERE user_id = %s", host))[0][0]
    assert sent >= new_start  # moved: it fired at the new time, not before

    # The internal RPCs: schedule, move, cancel.
    meta = notify.service_metadata
    await notify.stub.ScheduleReminder(
        pb.ScheduleReminderRequest(
            space="spaces/other",
            user=f"users/{other}",
            kind=res.REMINDER_KIND_SUBSCRIBER,
            fire_time=stamp(now() + dt.timedelta(hours=1)),
        ),
        metadata=meta,
    )
    moved_count = await notify.stub.RescheduleSpaceReminders(
        pb.RescheduleSpaceRemindersRequest(
            space="spaces/other", fire_time=stamp(now() + dt.timedelta(hours=2))
        ),
        metadata=meta,
    )
    assert moved_count.moved_count == 1
    canceled = await notify.stub.CancelReminder(
        pb.CancelReminderRequest(space="spaces/other", user=f"users/{other}"), metadata=meta
    )
    assert canceled.reminder.state == res.ScheduledReminder.STATE_CANCELED
    missing = await notify.stub.CancelReminder(
        pb.CancelReminderRequest(space="spaces/none", user=f"users/{other}"), metadata=meta
    )
    assert not missing.HasField("reminder")

    # A canceled Space: its scheduled reminders are dropped.
    await notify.stub.ScheduleReminder(
        pb.ScheduleReminderRequest(
            space="spaces/gone",
            user=f"users/{other}",
            kind=res.REMINDER_KIND_SUBSCRIBER,
            fire_time=stamp(now() + dt.timedelta(hours=1)),
        ),
        metadata=meta,
    )
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpaceCanceledEvent(space_id="gone", host_id=host),
    )

    async def dropped() -> bool:
        rows = await notify.sql("SELECT state FROM reminders WHERE space_id = 'gone'")
        return rows[0][0] == 3

    await eventually(dropped)
    notice = await notify.sql(
        "SELECT kind FROM notifications WHERE user_id = %s AND space = 'spaces/gone'", other
    )
    assert notice == [(res.NOTIFICATION_KIND_SPACE_CANCELED,)]


async def test_internal_rpcs_refuse_users(notify: Notify, identity: Identity) -> None:
    (user,) = await identity.bulk_users(1)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await notify.stub.ScheduleReminder(
            pb.ScheduleReminderRequest(
                space="spaces/x",
                user=f"users/{user}",
                kind=res.REMINDER_KIND_HOST,
                fire_time=stamp(now()),
            ),
            metadata=identity.token_for(user),
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_sigkill_while_reminders_fire_then_restart_sends_each_once(
    database_url: str, redis_url: str, identity: Identity, tmp_path: Path
) -> None:
    """20,000 reminders fall due together; notify is SIGKILLed part-way through sending them
    and started again: every reminder is sent exactly once, none before its time."""
    process = NotifyProcess(
        process_env(database_url, redis_url, identity, NOTIFY_CONSUMER_NAME="notify-rem"),
        tmp_path / "notify.log",
    )
    await process.start()
    try:
        notify_sql(
            database_url,
            """INSERT INTO reminders (space_id, user_id, kind, fire_time)
               SELECT 'crash-space', 'fan' || g, 2, now() + interval '1 second'
               FROM generate_series(1, 20000) g""",
        )

        def sent() -> int:
            return int(
                notify_sql(database_url, "SELECT count(*) FROM reminders WHERE state = 2")[0][0]
            )

        async def some_sent() -> bool:
            return sent() > 0

        await eventually(some_sent, timeout=30, interval=0.01)
        process.kill()
        before = sent()
        assert 0 < before < 20_000, before
        await process.start()

        async def all_sent() -> bool:
            return sent() == 20_000

        await eventually(all_sent, timeout=60, interval=0.1)
    finally:
        process.stop()
    counts = notify_sql(
        database_url,
        """SELECT count(*), count(DISTINCT user_id) FROM notifications
           WHERE kind = 3 AND space = 'spaces/crash-space'""",
    )
    assert counts == [(20_000, 20_000)]
    early = notify_sql(database_url, "SELECT count(*) FROM reminders WHERE sent_time < fire_time")
    assert early == [(0,)]
