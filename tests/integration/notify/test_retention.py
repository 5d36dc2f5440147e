"""Retention: expired notifications, finished deliveries, dedupe rows and finished work are
purged on schedule, in small steps, by one replica at a time; everything else stays."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from services.notify.retention import RetentionPolicy, RetentionWorker
from services.notify.store import RetentionStore
from tests.integration.notify.harness import Notify, eventually

Start = Callable[..., AbstractAsyncContextManager[Notify]]
DEFAULTS = RetentionPolicy(
    notifications=dt.timedelta(days=90),
    deliveries=dt.timedelta(days=14),
    processed_events=dt.timedelta(days=7),
    finished_work=dt.timedelta(days=30),
)


async def add_notification(notify: Notify, user: str, age: dt.timedelta, key: str) -> int:
    rows = await notify.sql(
        """INSERT INTO notifications (user_id, kind, title, dedupe_key, create_time)
           VALUES (%s, 8, 'hello', %s, now() - %s) RETURNING id""",
        user,
        key,
        age,
    )
    return int(rows[0][0])


async def add_delivery(notify: Notify, notification: int, state: int, age: dt.timedelta) -> None:
    await notify.sql(
        # Not due for days: the running delivery engine leaves it alone.
        """INSERT INTO deliveries (channel, target_id, user_id, notification_id, kind, state,
                                   create_time, next_attempt_time)
           VALUES (1, 'hook', 'u', %s, 8, %s, now() - %s, now() + interval '1 day')""",
        notification,
        state,
        age,
    )


def worker(notify: Notify, step_size: int = 2) -> RetentionWorker:
    assert notify.runtime.pool is not None
    return RetentionWorker(
        RetentionStore(notify.runtime.pool), DEFAULTS, interval_s=3600, step_size=step_size
    )


async def test_expired_rows_go_and_the_rest_stays(notify: Notify) -> None:
    days = dt.timedelta(days=1)
    # Oldest first, as ids are handed out in time order; five expired (more than two steps).
    old = [await add_notification(notify, "u", 100 * days, f"old:{i}") for i in range(5)]
    kept = [await add_notification(notify, "u", 89 * days, f"kept:{i}") for i in range(3)]
    await add_delivery(notify, old[0], 3, 20 * days)  # succeeded, expired
    await add_delivery(notify, old[1], 4, 20 * days)  # dead-lettered, expired
    await add_delivery(notify, kept[0], 2, 20 * days)  # still retrying: stays
    await add_delivery(notify, kept[1], 3, 13 * days)  # succeeded, recent: stays
    for age in (8 * days, 8 * days, 6 * days):
        await notify.sql(
            "INSERT INTO processed_events VALUES (%s, 'e', now() - %s)", uuid.uuid4(), age
        )
    for state, age in ((2, 31 * days), (3, 31 * days), (1, 31 * days), (2, 29 * days)):
        await notify.sql(
            # Leased to another replica: the running fan-out workers leave it alone.
            """INSERT INTO fanout_jobs (id, kind, host_id, space_id, title, visibility,
                                        dedupe_key, state, finish_time, create_time,
                                        lease_owner, lease_until)
               VALUES (%s, 1, 'h', 's', 't', 1, 'k', %s,
                       CASE WHEN %s <> 1 THEN now() - %s END, now() - %s,
                       'elsewhere', now() + interval '1 day')""",
            uuid.uuid4(),
            state,
            state,
            age,
            age,
        )
    for user, state, age in (("a", 2, 31 * days), ("b", 3, 31 * days), ("c", 1, 31 * days)):
        await notify.sql(
            """INSERT INTO reminders (space_id, user_id, kind, fire_time, state, update_time)
               VALUES ('sp', %s, 2, now() + interval '1 day', %s, now() - %s)""",
            user,
            state,
            age,
        )

    purged = await worker(notify).run_once()

    assert purged == {
        "notifications": 5,
        "deliveries": 2,
        "processed_events": 2,
        "fanout_jobs": 2,
        "reminders": 2,
    }
    assert [r[0] for r in await notify.sql("SELECT id FROM notifications ORDER BY id")] == kept
    assert await notify.sql("SELECT state FROM deliveries ORDER BY id") == [(2,), (3,)]
    assert await notify.sql("SELECT count(*) FROM processed_events") == [(1,)]
    assert sorted(await notify.sql("SELECT state FROM fanout_jobs")) == [(1,), (2,)]
    assert await notify.sql("SELECT user_id FROM reminders") == [("c",)]
    # Nothing left to do: a second run deletes nothing.
    again = await worker(notify).run_once()
    assert again is not None and set(again.values()) == {0}


async def test_one_replica_purges_at_a_time(notify: Notify) -> None:
    await add_notification(notify, "u", dt.timedelta(days=100), "old")
    assert notify.runtime.pool is not None
    other_replica = RetentionStore(notify.runtime.pool)
    async with other_replica.exclusive() as acquired:
        assert acquired
        assert await worker(notify).run_once() is None
        assert await notify.sql("SELECT count(*) FROM notifications") == [(1,)]
    # Released at the end of the other's run: the next round purges.
    purged = await worker(notify).run_once()
    assert purged is not None and purged["notifications"] == 1


async def test_purges_run_on_schedule_with_the_configured_retention(start_notify: Start) -> None:
    async with start_notify(
        retention_interval_s=0.2,
        retention_notifications=dt.timedelta(days=2),
        retention_deliveries=dt.timedelta(days=1),
    ) as notify:
        await add_notification(notify, "u", dt.timedelta(days=3), "expired")
        fresh = await add_notification(notify, "u", dt.timedelta(days=1), "fresh")

        async def purged() -> bool:
            rows = await notify.sql("SELECT id FROM notifications")
            return rows == [(fresh,)]

        await eventually(purged)
