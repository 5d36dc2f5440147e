"""Notify's storage: PostgreSQL schema ``notify`` behind the :class:`NotifyStore` protocol.

Two kinds of writer share the SQL here:

* event handlers, through :meth:`PostgresNotifyStore.event_transaction`, which records the
  event id in ``processed_events`` in the same transaction as the effect (a duplicate
  delivery finds the id and does nothing);
* the workers (fan-out, reminders, deliveries), which claim rows with ``FOR UPDATE SKIP
  LOCKED`` or a lease so any number of replicas can run them side by side.

Creating a notification also queues its webhook and push deliveries in the same statement
(data-modifying CTEs), so a notification never exists without its deliveries or the other
way round.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg.errors
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from services.common.db import Pool
from services.notify.domain import (
    Channel,
    DeliveryState,
    Draft,
    FanoutState,
    FanoutTemplate,
    WebhookState,
    reminder_wording,
    webhook_disabled_draft,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ClaimedDelivery",
    "CreatedNotification",
    "DeliveryRow",
    "DeviceRow",
    "EventTx",
    "FanoutJob",
    "LimitReached",
    "NotifyStore",
    "PostgresNotifyStore",
    "PreferencesRow",
    "ReminderRow",
    "RetentionStore",
    "WebhookRow",
    "create_notifications",
]

Conn = AsyncConnection[TupleRow]

_NOTIFICATION_COLUMNS = "user_id, id, kind, title, body, actor, space, subject, create_time, read"


@dataclass(frozen=True)
class CreatedNotification:
    """A notification row."""

    user_id: str
    id: int
    kind: int
    title: str
    body: str
    actor: str
    space: str
    subject: str
    create_time: dt.datetime
    read: bool


@dataclass(frozen=True)
class PreferencesRow:
    """A user's preferences (defaults when ``update_time`` is None)."""

    user_id: str
    disabled_kinds: list[int]
    push_disabled_kinds: list[int]
    muted_actors: list[str]
    version: int
    update_time: dt.datetime | None


@dataclass(frozen=True)
class WebhookRow:
    """A registered webhook."""

    id: str
    user_id: str
    url: str
    kinds: list[int]
    secret: str
    state: int
    create_time: dt.datetime
    request_id: uuid.UUID | None = None
    request_fingerprint: str | None = None
    consecutive_failures: int = 0
    disabled_time: dt.datetime | None = None
    disabled_reason: str = ""


@dataclass(frozen=True)
class DeviceRow:
    """A registered device."""

    id: str
    user_id: str
    platform: int
    token: str
    create_time: dt.datetime
    refresh_time: dt.datetime


@dataclass(frozen=True)
class DeliveryRow:
    """A delivery as ListWebhookDeliveries shows it."""

    id: int
    target_id: str
    user_id: str
    notification_id: int
    kind: int
    state: int
    attempt_count: int
    last_status_code: int
    last_error: str
    create_time: dt.datetime
    last_attempt_time: dt.datetime | None
    next_attempt_time: dt.datetime


@dataclass(frozen=True)
class ClaimedDelivery:
    """A due delivery, leased to this worker, with what is needed to attempt it."""

    id: int
    channel: int
    target_id: str
    attempt_count: int
    notification: CreatedNotification
    url: str | None
    secret: str | None
    platform: int | None
    token: str | None
    webhook_active: bool = True


@dataclass(frozen=True)
class FanoutJob:
    """A claimed fan-out job."""

    id: uuid.UUID
    kind: int
    host_id: str
    space_id: str
    title: str
    body: str
    visibility: int
    dedupe_key: str
    cursor: str

    def template(self) -> FanoutTemplate:
        """What each follower gets."""
        return FanoutTemplate(
            self.kind, self.title, self.body, self.host_id, self.space_id, self.dedupe_key
        )


@dataclass(frozen=True)
class ReminderRow:
    """A reminder as ScheduledReminder shows it."""

    space_id: str
    user_id: str
    kind: int
    fire_time: dt.datetime
    state: int


def _notification(row: Sequence[Any]) -> CreatedNotification:
    return CreatedNotification(*row)


# The filter every notification passes: the recipient's disabled kinds and muted actors,
# and blocks in either direction between recipient and actor.
_CREATE_FROM_DRAFTS = f"""
WITH src AS (
    SELECT * FROM unnest(%(users)s::text[], %(kinds)s::smallint[], %(titles)s::text[],
                         %(bodies)s::text[], %(actors)s::text[], %(spaces)s::text[],
                         %(subjects)s::text[], %(keys)s::text[])
        AS s(user_id, kind, title, body, actor_id, space, subject, dedupe_key)
), ok AS (
    SELECT src.* FROM src LEFT JOIN preferences p ON p.user_id = src.user_id
    WHERE (p.user_id IS NULL
           OR NOT (src.kind = ANY(p.disabled_kinds)
                   OR (src.actor_id <> '' AND src.actor_id = ANY(p.muted_actors))))
      AND NOT EXISTS (
        SELECT 1 FROM blocks b
        WHERE src.actor_id <> ''
          AND ((b.blocker_id = src.user_id AND b.blocked_id = src.actor_id)
               OR (b.blocker_id = src.actor_id AND b.blocked_id = src.user_id)))
), ins AS (
    INSERT INTO notifications (user_id, kind, title, body, actor, space, subject, dedupe_key)
    SELECT user_id, kind, title, body,
           CASE WHEN actor_id = '' THEN '' ELSE 'users/' || actor_id END,
           space, subject, dedupe_key
    FROM ok
    ON CONFLICT (user_id, dedupe_key) DO NOTHING
    RETURNING {_NOTIFICATION_COLUMNS}
), {{deliveries}}
SELECT {_NOTIFICATION_COLUMNS} FROM ins
"""

# The followers in ``fanout_staging`` who pass the filters of a fan-out's host and kind.
_FANOUT_RECIPIENTS = """
WITH excluded AS (
    SELECT blocked_id AS user_id FROM blocks WHERE blocker_id = %(actor_id)s
    UNION ALL
    SELECT blocker_id FROM blocks WHERE blocked_id = %(actor_id)s
), ok AS (
    SELECT s.user_id FROM fanout_staging s LEFT JOIN preferences p ON p.user_id = s.user_id
    WHERE (p.user_id IS NULL OR NOT (%(kind)s::smallint = ANY(p.disabled_kinds)
                                     OR %(actor_id)s = ANY(p.muted_actors)))
      AND s.user_id NOT IN (SELECT user_id FROM excluded)
      AND s.user_id <> %(actor_id)s
)"""

_FANOUT_ROWS = """
INSERT INTO notifications (user_id, kind, title, body, actor, space, subject, dedupe_key)
SELECT user_id, %(kind)s, %(title)s, %(body)s, %(actor)s, %(space)s, '', %(key)s FROM ok"""

# {conflict} is empty on the fast path (a duplicate raises unique_violation, and the batch
# is written again with ON CONFLICT DO NOTHING; see write_fanout_rows).
_FANOUT_INSERT = _FANOUT_RECIPIENTS + _FANOUT_ROWS + " {conflict}"
_FANOUT_INSERT_WITH_DELIVERIES = (
    _FANOUT_RECIPIENTS
    + ", ins AS ("
    + _FANOUT_ROWS
    + """ {conflict}
    RETURNING user_id, id, kind
), {deliveries}
SELECT count(*) FROM ins
"""
)
_SKIP_DUPLICATES = "ON CONFLICT (user_id, dedupe_key) DO NOTHING"

# Webhook deliveries for every new notification whose owner has a matching webhook, and
# push deliveries to devices on platforms with an adapter switched on.
_DELIVERIES = """
wh AS (
    INSERT INTO deliveries (channel, target_id, user_id, notification_id, kind)
    SELECT 1, w.id, ins.user_id, ins.id, ins.kind
    FROM ins JOIN webhooks w ON w.user_id = ins.user_id
    WHERE w.state = 1 AND (cardinality(w.kinds) = 0 OR ins.kind = ANY(w.kinds))
    ON CONFLICT DO NOTHING
), pu AS (
    INSERT INTO deliveries (channel, target_id, user_id, notification_id, kind)
    SELECT 2, d.id, ins.user_id, ins.id, ins.kind
    FROM ins JOIN devices d ON d.user_id = ins.user_id
         LEFT JOIN preferences p ON p.user_id = ins.user_id
    WHERE d.platform = ANY(%(platforms)s::smallint[])
      AND (p.user_id IS NULL OR NOT ins.kind = ANY(p.push_disabled_kinds))
    ON CONFLICT DO NOTHING
)"""


class EventTx:
    """The writes an event handler makes, all inside its event's transaction.

    :param conn: the connection, inside the transaction.
    :param push_platforms: platforms whose push adapter is on (others get no deliveries).
    """

    def __init__(self, conn: Conn, push_platforms: Sequence[int]) -> None:
        self.conn = conn
        self._platforms = list(push_platforms)

    async def create(self, drafts: Sequence[Draft]) -> list[CreatedNotification]:
        """Create notifications (filtered by preferences and blocks); return the new ones."""
        return await create_notifications(self.conn, drafts, self._platforms)

    async def create_fanout_job(
        self, job_id: uuid.UUID, template: FanoutTemplate, visibility: int
    ) -> None:
        """Queue a follower fan-out (idempotent on the job id)."""
        await self.conn.execute(
            """INSERT INTO fanout_jobs (id, kind, host_id, space_id, title, body, visibility,
                                        dedupe_key)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING""",
            (
                job_id,
                template.kind,
                template.actor_id,
                template.space_id,
                template.title,
                template.body,
                visibility,
                template.dedupe_key,
            ),
        )

    async def cancel_fanouts(self, space_id: str) -> int:
        """Stop the unfinished fan-outs of a Space (it ended or was canceled)."""
        cursor = await self.conn.execute(
            "UPDATE fanout_jobs SET state = %s, finish_time = now(), update_time = now()"
            " WHERE space_id = %s AND state = %s",
            (FanoutState.CANCELED, space_id, FanoutState.PENDING),
        )
        return cursor.rowcount

    async def remember_space(
        self, space_id: str, host_id: str, title: str, start: dt.datetime | None
    ) -> None:
        """Record (or update) a Space's host, title and scheduled start."""
        await self.conn.execute(
            """INSERT INTO spaces (space_id, host_id, title, scheduled_start_time)
               VALUES (%s, %s, %s, %s)
               ON CONFLICT (space_id) DO UPDATE SET host_id = excluded.host_id,
                   title = CASE WHEN excluded.title = '' THEN spaces.title
                                ELSE excluded.title END,
                   scheduled_start_time = COALESCE(excluded.scheduled_start_time,
                                                   spaces.scheduled_start_time)""",
            (space_id, host_id, title, start),
        )

    async def space(self, space_id: str) -> tuple[str, str] | None:
        """The (host id, title) of a Space notify has heard of."""
        cursor = await self.conn.execute(
            "SELECT host_id, title FROM spaces WHERE space_id = %s", (space_id,)
        )
        row = await cursor.fetchone()
        return (row[0], row[1]) if row else None

    async def set_block(self, blocker_id: str, blocked_id: str, blocked: bool) -> None:
        """Mirror identity's block edge."""
        if blocked:
            await self.conn.execute(
                "INSERT INTO blocks VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (blocker_id, blocked_id),
            )
        else:
            await self.conn.execute(
                "DELETE FROM blocks WHERE blocker_id = %s AND blocked_id = %s",
                (blocker_id, blocked_id),
            )

    async def set_ticket(self, space_id: str, ticket: str, user_id: str, held: bool) -> None:
        """Record or forget a ticket holder."""
        if held:
            await self.conn.execute(
                "INSERT INTO ticket_holders VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (space_id, user_id, ticket),
            )
        else:
            await self.conn.execute(
                "DELETE FROM ticket_holders WHERE space_id = %s AND ticket = %s",
                (space_id, ticket),
            )

    async def ticket_holders(self, space_id: str) -> list[str]:
        """Users holding a ticket for a Space."""
        cursor = await self.conn.execute(
            "SELECT DISTINCT user_id FROM ticket_holders WHERE space_id = %s", (space_id,)
        )
        return [row[0] for row in await cursor.fetchall()]

    async def schedule_reminder(
        self, space_id: str, user_id: str, kind: int, fire_time: dt.datetime
    ) -> ReminderRow | None:
        """Upsert a reminder; ``None`` when it was already sent (nothing changes)."""
        cursor = await self.conn.execute(
            """INSERT INTO reminders (space_id, user_id, kind, fire_time)
               VALUES (%s, %s, %s, %s)
               ON CONFLICT (space_id, user_id) DO UPDATE
                   SET kind = excluded.kind, fire_time = excluded.fire_time, state = 1,
                       update_time = now()
                   WHERE reminders.state <> 2
               RETURNING space_id, user_id, kind, fire_time, state""",
            (space_id, user_id, kind, fire_time),
        )
        row = await cursor.fetchone()
        return ReminderRow(*row) if row else None

    async def reminder(self, space_id: str, user_id: str) -> ReminderRow | None:
        """One reminder, locked for the rest of the transaction."""
        cursor = await self.conn.execute(
            "SELECT space_id, user_id, kind, fire_time, state FROM reminders"
            " WHERE space_id = %s AND user_id = %s FOR UPDATE",
            (space_id, user_id),
        )
        row = await cursor.fetchone()
        return ReminderRow(*row) if row else None

    async def cancel_reminder(self, space_id: str, user_id: str) -> ReminderRow | None:
        """Cancel a scheduled reminder; return it (canceled), or None if none was scheduled."""
        cursor = await self.conn.execute(
            """UPDATE reminders SET state = 3, update_time = now()
               WHERE space_id = %s AND user_id = %s AND state = 1
               RETURNING space_id, user_id, kind, fire_time, state""",
            (space_id, user_id),
        )
        row = await cursor.fetchone()
        return ReminderRow(*row) if row else None

    async def reschedule(
        self, space_id: str, fire_time: dt.datetime, kind: int | None = None
    ) -> int:
        """Move the scheduled reminders of a Space (of one kind, or all); return how many."""
        cursor = await self.conn.execute(
            """UPDATE reminders SET fire_time = %s, update_time = now()
               WHERE space_id = %s AND state = 1 AND (%s::smallint IS NULL OR kind = %s)""",
            (fire_time, space_id, kind, kind),
        )
        return cursor.rowcount

    async def scheduled_reminder_users(self, space_id: str) -> list[str]:
        """Users with a scheduled subscriber reminder for a Space."""
        cursor = await self.conn.execute(
            "SELECT user_id FROM reminders WHERE space_id = %s AND state = 1 AND kind = 2",
            (space_id,),
        )
        return [row[0] for row in await cursor.fetchall()]

    async def cancel_space_reminders(self, space_id: str) -> int:
        """Cancel every scheduled reminder of a Space."""
        cursor = await self.conn.execute(
            "UPDATE reminders SET state = 3, update_time = now() WHERE space_id = %s AND state = 1",
            (space_id,),
        )
        return cursor.rowcount

    async def fire_space_reminders_now(self, space_id: str) -> int:
        """Make a Space's scheduled reminders due at once (it started early)."""
        cursor = await self.conn.execute(
            "UPDATE reminders SET fire_time = now(), update_time = now()"
            " WHERE space_id = %s AND state = 1 AND fire_time > now()",
            (space_id,),
        )
        return cursor.rowcount


async def create_notifications(
    conn: Conn, drafts: Sequence[Draft], push_platforms: Sequence[int]
) -> list[CreatedNotification]:
    """Insert drafts that pass the filters, with their deliveries; return the new rows."""
    if not drafts:
        return []
    cursor = await conn.execute(
        _CREATE_FROM_DRAFTS.format(deliveries=_DELIVERIES),
        {
            "users": [d.user_id for d in drafts],
            "kinds": [d.kind for d in drafts],
            "titles": [d.title for d in drafts],
            "bodies": [d.body for d in drafts],
            "actors": [d.actor_id for d in drafts],
            "spaces": [d.space for d in drafts],
            "subjects": [d.subject for d in drafts],
            "keys": [d.dedupe_key for d in drafts],
            "platforms": list(push_platforms),
        },
    )
    return [_notification(row) for row in await cursor.fetchall()]


class NotifyStore(Protocol):
    """What the API and the workers need from storage."""

    async def list_notifications(
        self, user_id: str, before_id: int | None, limit: int, unread_only: bool
    ) -> list[CreatedNotification]: ...

    async def unread_count(self, user_id: str) -> int: ...

    async def mark_read_ids(self, user_id: str, ids: Sequence[int]) -> tuple[int, int]: ...

    async def mark_read_before(self, user_id: str, before: dt.datetime) -> tuple[int, int]: ...

    async def get_preferences(self, user_id: str) -> PreferencesRow: ...

    async def update_preferences(
        self, user_id: str, changes: dict[str, list[Any]], expected_version: int | None
    ) -> PreferencesRow | None: ...


class PostgresNotifyStore:
    """:class:`NotifyStore` on PostgreSQL.

    :param pool: a pool on schema ``notify``.
    :param push_platforms: platforms whose push adapter is on.
    """

    def __init__(self, pool: Pool, push_platforms: Sequence[int] = ()) -> None:
        self.pool = pool
        self.push_platforms = list(push_platforms)

    # -- events ------------------------------------------------------------------------

    @asynccontextmanager
    async def event_transaction(
        self, event_id: uuid.UUID, event_type: str
    ) -> AsyncIterator[EventTx | None]:
        """A transaction for one event's effect; yields ``None`` when it was applied before.

        The ``processed_events`` insert comes first: a second replica handling the same
        event at the same moment waits on the row lock, then sees the conflict.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "INSERT INTO processed_events (event_id, event_type) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                (event_id, event_type),
            )
            yield EventTx(conn, self.push_platforms) if cursor.rowcount == 1 else None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[EventTx]:
        """A plain transaction with the event-side writes (internal RPCs)."""
        async with self.pool.connection() as conn, conn.transaction():
            yield EventTx(conn, self.push_platforms)

    # -- inbox -------------------------------------------------------------------------

    async def list_notifications(
        self, user_id: str, before_id: int | None, limit: int, unread_only: bool
    ) -> list[CreatedNotification]:
        """Newest first, ids below ``before_id``.

        ``id + 0`` keeps the planner from walking the whole ``id`` index backwards in
        search of one user's rows: a user's rows come from ``(user_id, dedupe_key)`` and
        are sorted (retention bounds how many there are).
        """
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                f"""SELECT {_NOTIFICATION_COLUMNS} FROM notifications
                    WHERE user_id = %s AND (%s::bigint IS NULL OR id < %s)
                      AND (NOT %s OR NOT read)
                    ORDER BY id + 0 DESC LIMIT %s""",
                (user_id, before_id, before_id, unread_only, limit),
            )
            return [_notification(row) for row in await cursor.fetchall()]

    async def notifications_by_key(
        self, user_ids: Sequence[str], dedupe_key: str
    ) -> list[CreatedNotification]:
        """The notifications with ``dedupe_key`` of the given users (live delivery)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications"
                " WHERE user_id = ANY(%s) AND dedupe_key = %s",
                (list(user_ids), dedupe_key),
            )
            return [_notification(row) for row in await cursor.fetchall()]

    async def unread_count(self, user_id: str) -> int:
        """Unread notifications of a user."""
        async with self.pool.connection() as conn:
            return await _unread(conn, user_id)

    async def mark_read_ids(self, user_id: str, ids: Sequence[int]) -> tuple[int, int]:
        """Mark the named notifications read; return (newly marked, unread after)."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE notifications SET read = true"
                " WHERE user_id = %s AND id = ANY(%s) AND NOT read",
                (user_id, list(ids)),
            )
            return cursor.rowcount, await _unread(conn, user_id)

    async def mark_read_before(self, user_id: str, before: dt.datetime) -> tuple[int, int]:
        """Mark everything created at or before ``before`` read."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE notifications SET read = true"
                " WHERE user_id = %s AND create_time <= %s AND NOT read",
                (user_id, before),
            )
            return cursor.rowcount, await _unread(conn, user_id)

    # -- preferences -------------------------------------------------------------------

    async def get_preferences(self, user_id: str) -> PreferencesRow:
        """A user's preferences, defaults when never set."""
        async with self.pool.connection() as conn:
            return await _preferences(conn, user_id)

    async def update_preferences(
        self, user_id: str, changes: dict[str, list[Any]], expected_version: int | None
    ) -> PreferencesRow | None:
        """Apply ``changes`` (column → new value); ``None`` when the version moved on."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO preferences (user_id) VALUES (%s) ON CONFLICT DO NOTHING",
                (user_id,),
            )
            cursor = await conn.execute(
                "SELECT version FROM preferences WHERE user_id = %s FOR UPDATE", (user_id,)
            )
            row = await cursor.fetchone()
            assert row is not None
            if expected_version is not None and row[0] != expected_version:
                return None
            current = await _preferences(conn, user_id)
            values = {
                "disabled_kinds": changes.get("disabled_kinds", current.disabled_kinds),
                "push_disabled_kinds": changes.get(
                    "push_disabled_kinds", current.push_disabled_kinds
                ),
                "muted_actors": changes.get("muted_actors", current.muted_actors),
            }
            await conn.execute(
                """UPDATE preferences SET disabled_kinds = %s, push_disabled_kinds = %s,
                       muted_actors = %s, version = version + 1, update_time = now()
                   WHERE user_id = %s""",
                (
                    values["disabled_kinds"],
                    values["push_disabled_kinds"],
                    values["muted_actors"],
                    user_id,
                ),
            )
            return await _preferences(conn, user_id)

    # -- fan-out -----------------------------------------------------------------------

    async def claim_fanout_job(self, owner: str, lease_s: float) -> FanoutJob | None:
        """Lease the pending job that progressed least recently (fair between jobs).

        A job whose lease is held by this owner (a restart under the same name) or has
        expired (its replica died) can be taken.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                """UPDATE fanout_jobs j
                   SET lease_owner = %(owner)s,
                       lease_until = now() + make_interval(secs => %(lease)s)
                   FROM (SELECT id FROM fanout_jobs
                         WHERE state = 1
                           AND (lease_until IS NULL OR lease_until < now()
                                OR lease_owner = %(owner)s)
                         ORDER BY update_time LIMIT 1 FOR UPDATE SKIP LOCKED) due
                   WHERE j.id = due.id
                   RETURNING j.id, j.kind, j.host_id, j.space_id, j.title, j.body,
                             j.visibility, j.dedupe_key, j.cursor""",
                {"owner": owner, "lease": lease_s},
            )
            row = await cursor.fetchone()
            return FanoutJob(*row) if row else None

    async def write_fanout_rows(
        self, job: FanoutJob, owner: str, user_ids: Sequence[str]
    ) -> int | None:
        """Write one batch of a fan-out's notifications (with their deliveries).

        Batches are idempotent, which is what makes a fan-out exactly-once: the unique
        index on ``(user_id, dedupe_key)`` refuses a second notification of the same
        fan-out to one user, whoever writes it (a replay after a crash between this
        transaction and :meth:`advance_fanout_cursor`, a worker that lost its lease, a
        follower streamed twice). The first attempt is a plain INSERT: without ``ON
        CONFLICT`` PostgreSQL skips the speculative insertion that costs about a third of
        the statement. Only if that attempt meets a duplicate (``unique_violation``) is the
        batch written again with ``ON CONFLICT DO NOTHING``.

        :return: notifications created, or ``None`` when the job is no longer ours (lease
            taken over, canceled or finished): the caller stops.
        """
        if not user_ids:
            return 0 if await self._owns_fanout(job.id, owner) else None
        try:
            return await self._insert_fanout_rows(job, owner, user_ids, conflict="")
        except psycopg.errors.UniqueViolation:
            logger.info("fan-out %s: a batch met earlier notifications; skipping them", job.id)
            return await self._insert_fanout_rows(job, owner, user_ids, conflict=_SKIP_DUPLICATES)

    async def _owns_fanout(self, job_id: uuid.UUID, owner: str) -> bool:
        async with self.pool.connection() as conn:
            return await _fanout_owned(conn, job_id, owner)

    async def _insert_fanout_rows(
        self, job: FanoutJob, owner: str, user_ids: Sequence[str], *, conflict: str
    ) -> int | None:
        # Round trips count as much as rows on a busy machine: the settings and the staging
        # table go in one simple query, the ownership and delivery-target checks in one
        # SELECT. A crash loses at most the last few committed batches together with their
        # cursor, and batches are idempotent: no fsync per batch. The insert's estimated
        # cost crosses the JIT threshold; compiling it costs more than the insert.
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SET LOCAL synchronous_commit = off; SET LOCAL jit = off;"
                " CREATE TEMP TABLE IF NOT EXISTS fanout_staging (user_id text NOT NULL)"
                " ON COMMIT DELETE ROWS"
            )
            async with conn.cursor().copy("COPY fanout_staging (user_id) FROM STDIN") as copy:
                await copy.write("\n".join(user_ids).encode() + b"\n")
            # Most users have no webhook or device: skip joining a batch against them.
            cursor = await conn.execute(
                """SELECT EXISTS (SELECT 1 FROM fanout_jobs
                                  WHERE id = %s AND lease_owner = %s AND state = 1),
                          EXISTS (SELECT 1 FROM webhooks WHERE state = 1)
                          OR EXISTS (SELECT 1 FROM devices WHERE platform = ANY(%s))""",
                (job.id, owner, self.push_platforms),
            )
            checks = await cursor.fetchone()
            if checks is None or not checks[0]:
                return None
            params = {
                "actor_id": job.host_id,
                "actor": f"users/{job.host_id}",
                "kind": job.kind,
                "title": job.title,
                "body": job.body,
                "space": f"spaces/{job.space_id}",
                "key": job.dedupe_key,
                "platforms": self.push_platforms,
            }
            if not checks[1]:
                cursor = await conn.execute(_FANOUT_INSERT.format(conflict=conflict), params)
                return max(cursor.rowcount, 0)
            cursor = await conn.execute(
                _FANOUT_INSERT_WITH_DELIVERIES.format(conflict=conflict, deliveries=_DELIVERIES),
                params,
            )
            count = await cursor.fetchone()
            return int(count[0]) if count else 0

    async def advance_fanout_cursor(
        self,
        job_id: uuid.UUID,
        owner: str,
        expected_cursor: str,
        next_cursor: str,
        created: int,
        lease_s: float,
    ) -> bool:
        """Move a job's cursor past batches already written, and renew the lease.

        :return: False when the job is no longer ours or its cursor moved (the caller stops).
        """
        # One round trip (pipeline): BEGIN, the setting, the update, COMMIT. Losing this
        # update in a crash only replays batches, which are idempotent: no fsync.
        async with self.pool.connection() as conn:
            async with conn.pipeline(), conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = off")
                cursor = await conn.execute(
                    """UPDATE fanout_jobs SET cursor = %s, created = created + %s,
                           batches = batches + 1, update_time = now(),
                           lease_until = now() + make_interval(secs => %s)
                       WHERE id = %s AND lease_owner = %s AND state = 1 AND cursor = %s""",
                    (next_cursor, created, lease_s, job_id, owner, expected_cursor),
                )
            return cursor.rowcount == 1

    async def finish_fanout_job(self, job_id: uuid.UUID, owner: str) -> float | None:
        """Mark a job done (only while this owner holds it).

        :return: seconds from the job's creation to now, or ``None`` if it was not ours.
        """
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE fanout_jobs SET state = 2, finish_time = now(), update_time = now(),"
                " lease_until = NULL WHERE id = %s AND lease_owner = %s AND state = 1"
                " RETURNING extract(epoch FROM now() - create_time)::float8",
                (job_id, owner),
            )
            row = await cursor.fetchone()
            return float(row[0]) if row else None

    async def release_fanout_job(self, job_id: uuid.UUID, owner: str) -> None:
        """Give a job back so others (and other jobs) get a turn."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE fanout_jobs SET lease_until = NULL, lease_owner = NULL,"
                " update_time = now() WHERE id = %s AND lease_owner = %s",
                (job_id, owner),
            )

    async def pending_fanouts(self) -> tuple[int, dt.datetime | None]:
        """How many fan-outs are unfinished, and when the oldest was created (metrics)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT count(*), min(create_time) FROM fanout_jobs WHERE state = 1"
            )
            row = await cursor.fetchone()
            return (int(row[0]), row[1]) if row else (0, None)

    # -- reminders ---------------------------------------------------------------------

    async def fire_due_reminders(
        self, limit: int
    ) -> tuple[list[CreatedNotification], list[dt.timedelta]]:
        """Send due reminders (claimed with SKIP LOCKED); return the notifications and lateness."""
        async with self.pool.connection() as conn, conn.transaction():
            # Claimed and marked sent in one statement (the due rows are found through the
            # partial index and updated by primary key); the notifications follow in the
            # same transaction, so a crash undoes both.
            cursor = await conn.execute(
                """UPDATE reminders r SET state = 2, sent_time = now(), update_time = now()
                   FROM (SELECT space_id, user_id FROM reminders
                         WHERE state = 1 AND fire_time <= now()
                         ORDER BY fire_time LIMIT %s FOR UPDATE SKIP LOCKED) due
                   WHERE r.space_id = due.space_id AND r.user_id = due.user_id
                   RETURNING r.space_id, r.user_id, r.kind, r.fire_time, now() - r.fire_time""",
                (limit,),
            )
            claimed = await cursor.fetchall()
            if not claimed:
                return [], []
            cursor = await conn.execute(
                "SELECT space_id, title, host_id FROM spaces WHERE space_id = ANY(%s)",
                (sorted({r[0] for r in claimed}),),
            )
            spaces = {row[0]: (row[1], row[2]) for row in await cursor.fetchall()}
            rows = [(*r, *spaces.get(r[0], ("", ""))) for r in claimed]
            drafts = []
            for space_id, user_id, kind, _fire, _late, title, host_id in rows:
                heading, body = reminder_wording(kind, title)
                drafts.append(
                    Draft(
                        user_id=user_id,
                        kind=3,
                        title=heading,
                        body=body,
                        # The host's own reminder has no actor; a subscriber's names the host
                        # so muting the host silences it too.
                        actor_id=host_id if kind == 2 else "",
                        space_id=space_id,
                        dedupe_key=f"reminder:{space_id}",
                    )
                )
            created = await create_notifications(conn, drafts, self.push_platforms)
            return created, [r[4] for r in rows]

    async def seconds_to_next_reminder(self) -> float | None:
        """Seconds until the earliest scheduled reminder (negative when overdue)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT extract(epoch FROM min(fire_time) - now())::float8 FROM reminders"
                " WHERE state = 1"
            )
            row = await cursor.fetchone()
            return float(row[0]) if row and row[0] is not None else None

    async def overdue_reminders(self) -> int:
        """Scheduled reminders past their time (should stay near zero)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT count(*) FROM reminders WHERE state = 1 AND fire_time <= now()"
            )
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

    # -- webhooks ----------------------------------------------------------------------

    async def create_webhook(self, row: WebhookRow, limit: int) -> tuple[WebhookRow, bool]:
        """Insert a webhook; return (the webhook, created) — an existing one for a replayed
        request id.

        :raises LimitReached: the user has ``limit`` webhooks.
        """
        async with self.pool.connection() as conn, conn.transaction():
            # Serialize one user's creations so the limit holds under concurrency.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('notify.webhooks.' || %s, 0))",
                (row.user_id,),
            )
            if row.request_id is not None:
                cursor = await conn.execute(
                    f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks"
                    " WHERE user_id = %s AND request_id = %s",
                    (row.user_id, row.request_id),
                )
                existing = await cursor.fetchone()
                if existing is not None:
                    return WebhookRow(*existing), False
            cursor = await conn.execute(
                "SELECT count(*) FROM webhooks WHERE user_id = %s", (row.user_id,)
            )
            count = await cursor.fetchone()
            if count is not None and count[0] >= limit:
                raise LimitReached()
            cursor = await conn.execute(
                f"""INSERT INTO webhooks (id, user_id, url, kinds, secret, request_id,
                                          request_fingerprint)
                    VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_WEBHOOK_COLUMNS}""",
                (
                    row.id,
                    row.user_id,
                    row.url,
                    row.kinds,
                    row.secret,
                    row.request_id,
                    row.request_fingerprint,
                ),
            )
            created = await cursor.fetchone()
            assert created is not None
            return WebhookRow(*created), True

    async def list_webhooks(
        self, user_id: str, after: tuple[dt.datetime, str] | None, limit: int
    ) -> list[WebhookRow]:
        """Oldest first, after the (create_time, id) position."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                f"""SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE user_id = %s
                      AND (%s::timestamptz IS NULL OR (create_time, id) > (%s, %s))
                    ORDER BY create_time, id LIMIT %s""",
                (
                    user_id,
                    after[0] if after else None,
                    after[0] if after else None,
                    after[1] if after else None,
                    limit,
                ),
            )
            return [WebhookRow(*row) for row in await cursor.fetchall()]

    async def get_webhook(self, user_id: str, webhook_id: str) -> WebhookRow | None:
        """One webhook of a user."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE user_id = %s AND id = %s",
                (user_id, webhook_id),
            )
            row = await cursor.fetchone()
            return WebhookRow(*row) if row else None

    async def delete_webhook(self, user_id: str, webhook_id: str) -> bool:
        """Delete a webhook and drop its pending deliveries."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "DELETE FROM webhooks WHERE user_id = %s AND id = %s", (user_id, webhook_id)
            )
            if cursor.rowcount == 0:
                return False
            await conn.execute(
                "DELETE FROM deliveries WHERE channel = 1 AND target_id = %s", (webhook_id,)
            )
            return True

    async def record_webhook_success(self, webhook_id: str) -> None:
        """A delivery to the webhook succeeded: its run of failures is over."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE webhooks SET consecutive_failures = 0"
                " WHERE id = %s AND consecutive_failures <> 0",
                (webhook_id,),
            )

    async def record_webhook_failure(
        self, webhook_id: str, error: str, disable_after: int
    ) -> WebhookRow | None:
        """Count a failed attempt; disable the webhook at ``disable_after`` in a row.

        Disabling dead-letters the webhook's queued deliveries (they would only fail too)
        and tells the owner in their inbox, all in one transaction.

        :return: the webhook if this failure disabled it, else ``None``.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                """UPDATE webhooks
                   SET consecutive_failures = consecutive_failures + 1,
                       last_failure_time = now()
                   WHERE id = %s AND state = %s
                   RETURNING consecutive_failures""",
                (webhook_id, WebhookState.ACTIVE),
            )
            row = await cursor.fetchone()
            if row is None or row[0] < disable_after:
                return None
            reason = f"{row[0]} failed attempts in a row; last: {error or 'failure'}"
            cursor = await conn.execute(
                f"""UPDATE webhooks SET state = %s, disabled_time = now(), disabled_reason = %s
                    WHERE id = %s RETURNING {_WEBHOOK_COLUMNS}""",
                (WebhookState.DISABLED, reason, webhook_id),
            )
            disabled = WebhookRow(*(await cursor.fetchone() or ()))
            await conn.execute(
                """UPDATE deliveries SET state = %s, last_error = %s
                   WHERE channel = %s AND target_id = %s AND state IN (%s, %s)""",
                (
                    DeliveryState.DEAD_LETTERED,
                    "webhook disabled: " + reason,
                    Channel.WEBHOOK,
                    webhook_id,
                    DeliveryState.PENDING,
                    DeliveryState.RETRYING,
                ),
            )
            assert disabled.disabled_time is not None
            notice = webhook_disabled_draft(
                disabled.user_id, disabled.id, disabled.url, reason, disabled.disabled_time
            )
            await create_notifications(conn, [notice], self.push_platforms)
            return disabled

    async def enable_webhook(self, user_id: str, webhook_id: str) -> WebhookRow | None:
        """Turn a webhook back on with a clean failure count; ``None`` if there is none."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                f"""UPDATE webhooks
                    SET state = %s, consecutive_failures = 0, disabled_time = NULL,
                        disabled_reason = ''
                    WHERE user_id = %s AND id = %s RETURNING {_WEBHOOK_COLUMNS}""",
                (WebhookState.ACTIVE, user_id, webhook_id),
            )
            row = await cursor.fetchone()
            return WebhookRow(*row) if row else None

    async def list_deliveries(
        self, webhook_id: str, state: int | None, before_id: int | None, limit: int
    ) -> list[DeliveryRow]:
        """A webhook's deliveries of the last 7 days, newest first."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                """SELECT id, target_id, user_id, notification_id, kind, state, attempt_count,
                          last_status_code, last_error, create_time, last_attempt_time,
                          next_attempt_time
                   FROM deliveries
                   WHERE channel = 1 AND target_id = %s
                     AND create_time > now() - interval '7 days'
                     AND (%s::smallint IS NULL OR state = %s)
                     AND (%s::bigint IS NULL OR id < %s)
                   ORDER BY id DESC LIMIT %s""",
                (webhook_id, state, state, before_id, before_id, limit),
            )
            return [DeliveryRow(*row) for row in await cursor.fetchall()]

    # -- devices -----------------------------------------------------------------------

    async def register_device(
        self, device_id: str, user_id: str, platform: int, token: str, limit: int
    ) -> DeviceRow:
        """Register or refresh a device; a token of another user moves to this one.

        :raises LimitReached: the user already has ``limit`` other devices.
        """
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('notify.devices.' || %s, 0))",
                (user_id,),
            )
            cursor = await conn.execute(
                "SELECT id, user_id FROM devices WHERE platform = %s AND token = %s FOR UPDATE",
                (platform, token),
            )
            existing = await cursor.fetchone()
            if existing is None or existing[1] != user_id:
                cursor = await conn.execute(
                    "SELECT count(*) FROM devices WHERE user_id = %s", (user_id,)
                )
                count = await cursor.fetchone()
                if count is not None and count[0] >= limit:
                    raise LimitReached()
            cursor = await conn.execute(
                f"""INSERT INTO devices (id, user_id, platform, token) VALUES (%s, %s, %s, %s)
                    ON CONFLICT (platform, token) DO UPDATE
                        SET user_id = excluded.user_id, refresh_time = now(),
                            create_time = CASE WHEN devices.user_id = excluded.user_id
                                               THEN devices.create_time ELSE now() END
                    RETURNING {_DEVICE_COLUMNS}""",
                (device_id, user_id, platform, token),
            )
            row = await cursor.fetchone()
            assert row is not None
            return DeviceRow(*row)

    async def unregister_device(self, user_id: str, device_id: str) -> None:
        """Remove a device and its pending pushes."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM devices WHERE user_id = %s AND id = %s", (user_id, device_id)
            )
            await conn.execute(
                "DELETE FROM deliveries WHERE channel = 2 AND target_id = %s AND state IN (1, 2)",
                (device_id,),
            )

    async def remove_device(self, device_id: str) -> None:
        """Forget a device whose token the push service rejected."""
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM devices WHERE id = %s", (device_id,))

    # -- deliveries --------------------------------------------------------------------

    async def claim_deliveries(self, limit: int, lease_s: float) -> list[ClaimedDelivery]:
        """Lease due deliveries: their next_attempt_time moves past the attempt, so a worker
        that dies mid-attempt has them retried after ``lease_s``."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                """UPDATE deliveries d
                   SET next_attempt_time = now() + make_interval(secs => %s)
                   FROM (SELECT id FROM deliveries
                         WHERE state IN (1, 2) AND next_attempt_time <= now()
                         ORDER BY next_attempt_time LIMIT %s FOR UPDATE SKIP LOCKED) due
                   WHERE d.id = due.id
                   RETURNING d.id""",
                (lease_s, limit),
            )
            ids = [row[0] for row in await cursor.fetchall()]
            if not ids:
                return []
            cursor = await conn.execute(
                f"""SELECT d.id, d.channel, d.target_id, d.attempt_count,
                           {", ".join("n." + c.strip() for c in _NOTIFICATION_COLUMNS.split(","))},
                           w.url, w.secret, dv.platform, dv.token, w.state
                    FROM deliveries d
                    JOIN notifications n ON n.user_id = d.user_id AND n.id = d.notification_id
                    LEFT JOIN webhooks w ON d.channel = 1 AND w.id = d.target_id
                    LEFT JOIN devices dv ON d.channel = 2 AND dv.id = d.target_id
                    WHERE d.id = ANY(%s)""",
                (ids,),
            )
            claimed = []
            for row in await cursor.fetchall():
                claimed.append(
                    ClaimedDelivery(
                        id=row[0],
                        channel=row[1],
                        target_id=row[2],
                        attempt_count=row[3],
                        notification=_notification(row[4:14]),
                        url=row[14],
                        secret=row[15],
                        platform=row[16],
                        token=row[17],
                        webhook_active=row[18] in (None, WebhookState.ACTIVE),
                    )
                )
            return claimed

    async def record_attempt(
        self,
        delivery_id: int,
        *,
        state: DeliveryState,
        status_code: int,
        error: str,
        next_attempt_in_s: float | None,
    ) -> None:
        """Store an attempt's outcome and the next step."""
        async with self.pool.connection() as conn:
            await conn.execute(
                """UPDATE deliveries SET state = %s, attempt_count = attempt_count + 1,
                       last_status_code = %s, last_error = %s, last_attempt_time = now(),
                       next_attempt_time = now() + make_interval(secs => %s)
                   WHERE id = %s""",
                (state, status_code, error, next_attempt_in_s or 0.0, delivery_id),
            )

    async def drop_delivery(self, delivery_id: int, error: str) -> None:
        """Dead-letter a delivery whose target vanished."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE deliveries SET state = %s, last_error = %s WHERE id = %s",
                (DeliveryState.DEAD_LETTERED, error, delivery_id),
            )


# One step of a retention walk over a table keyed by an increasing id: the next ``limit``
# ids after ``after``, of which those created before the cutoff (and matching {extra}) are
# deleted. Ids grow with time, so once a step meets rows newer than the cutoff the walk has
# reached the retained part of the table and stops: no step scans more than ``limit`` rows.
_PURGE_STEP = """
WITH step AS (
    SELECT id, create_time FROM {table} WHERE id > %(after)s ORDER BY id LIMIT %(limit)s
), gone AS (
    DELETE FROM {table} t USING step
    WHERE t.id = step.id AND step.create_time < %(cutoff)s {extra}
    RETURNING t.id
)
SELECT (SELECT max(id) FROM step),
       (SELECT count(*) FROM step WHERE create_time >= %(cutoff)s),
       (SELECT count(*) FROM gone)
"""

# What retention may delete, by name (the metric label) → the step's statement.
_PURGES: dict[str, str] = {
    "notifications": _PURGE_STEP.format(table="notifications", extra=""),
    # Only finished deliveries: pending ones are still being attempted.
    "deliveries": _PURGE_STEP.format(
        table="deliveries",
        extra=f"AND t.state IN ({DeliveryState.SUCCEEDED:d}, {DeliveryState.DEAD_LETTERED:d})",
    ),
}


class RetentionStore:
    """The deletes of :class:`~services.notify.retention.RetentionWorker`, in bounded steps
    (short transactions, no long locks, no table scans).

    :param pool: a pool on schema ``notify``.
    """

    LOCK_KEY = "notify.retention"

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[bool]:
        """Hold the retention lock for the block; yields False if another replica has it.

        A session advisory lock on a connection of its own: it is released when the block
        ends, or when the process dies and its connection closes.
        """
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self.LOCK_KEY,)
            )
            row = await cursor.fetchone()
            await conn.commit()
            acquired = bool(row and row[0])
            try:
                yield acquired
            finally:
                if acquired:
                    await conn.execute(
                        "SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (self.LOCK_KEY,)
                    )
                    await conn.commit()

    async def purge_by_id(self, table: str, cutoff: dt.datetime, step_size: int) -> int:
        """Delete the rows of ``table`` (a key of the id-keyed purges) created before
        ``cutoff``; return how many."""
        statement = _PURGES[table]
        after, total = 0, 0
        while True:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    statement, {"after": after, "limit": step_size, "cutoff": cutoff}
                )
                row = await cursor.fetchone()
            assert row is not None
            last, newer, deleted = row
            total += int(deleted)
            if last is None or newer:
                return total
            after = int(last)

    async def purge_processed_events(self, cutoff: dt.datetime, step_size: int) -> int:
        """Forget event ids applied before ``cutoff`` (the dedupe window); return how many."""
        return await self._purge_until_done(
            """DELETE FROM processed_events WHERE event_id IN (
                   SELECT event_id FROM processed_events WHERE processed_at < %(cutoff)s
                   ORDER BY processed_at LIMIT %(limit)s)""",
            cutoff,
            step_size,
        )

    async def purge_finished_fanouts(self, cutoff: dt.datetime, step_size: int) -> int:
        """Delete fan-out jobs that finished (or were canceled) before ``cutoff``."""
        return await self._purge_until_done(
            """DELETE FROM fanout_jobs WHERE id IN (
                   SELECT id FROM fanout_jobs
                   WHERE state <> 1 AND finish_time < %(cutoff)s LIMIT %(limit)s)""",
            cutoff,
            step_size,
        )

    async def purge_finished_reminders(self, cutoff: dt.datetime, step_size: int) -> int:
        """Delete reminders sent or canceled before ``cutoff``."""
        return await self._purge_until_done(
            """DELETE FROM reminders WHERE (space_id, user_id) IN (
                   SELECT space_id, user_id FROM reminders
                   WHERE state <> 1 AND update_time < %(cutoff)s LIMIT %(limit)s)""",
            cutoff,
            step_size,
        )

    async def _purge_until_done(self, statement: str, cutoff: dt.datetime, step_size: int) -> int:
        total = 0
        while True:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(statement, {"cutoff": cutoff, "limit": step_size})
            total += max(cursor.rowcount, 0)
            if cursor.rowcount < step_size:
                return total


class LimitReached(Exception):
    """A per-user limit (webhooks, devices) would be exceeded."""


_WEBHOOK_COLUMNS = (
    "id, user_id, url, kinds, secret, state, create_time, request_id, request_fingerprint,"
    " consecutive_failures, disabled_time, disabled_reason"
)
_DEVICE_COLUMNS = "id, user_id, platform, token, create_time, refresh_time"


async def _fanout_owned(conn: Conn, job_id: uuid.UUID, owner: str) -> bool:
    cursor = await conn.execute(
        "SELECT 1 FROM fanout_jobs WHERE id = %s AND lease_owner = %s AND state = 1",
        (job_id, owner),
    )
    return await cursor.fetchone() is not None


async def _unread(conn: Conn, user_id: str) -> int:
    cursor = await conn.execute(
        "SELECT count(*) FROM notifications WHERE user_id = %s AND NOT read", (user_id,)
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _preferences(conn: Conn, user_id: str) -> PreferencesRow:
    cursor = await conn.execute(
        """SELECT user_id, disabled_kinds, push_disabled_kinds, muted_actors, version,
                  update_time FROM preferences WHERE user_id = %s""",
        (user_id,),
    )
    row = await cursor.fetchone()
    if row is None:
        return PreferencesRow(user_id, [], [], [], 0, None)
    return PreferencesRow(row[0], list(row[1]), list(row[2]), list(row[3]), row[4], row[5])
