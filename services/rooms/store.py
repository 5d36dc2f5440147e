"""Rooms' durable state in PostgreSQL (schema ``rooms``).

:class:`SpaceStore` hands out units of work (:class:`RoomsTx`): one transaction each, so a
state change, its live event and its outbox events commit together. Role changes lock the
Space's row first (``lock=True``), which serializes them per Space: fifty approvals at once
queue on the lock and each sees the counts the previous one left, so limits hold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from services.common.db import Pool
from services.rooms.domain import (
    Counts,
    EndReason,
    Invitation,
    InvitationKind,
    Participant,
    Pinned,
    RecordingState,
    Role,
    Space,
    SpeakPermission,
    State,
    Visibility,
)
from services.rooms.tokens import moment_of, time_key

logger = logging.getLogger(__name__)

__all__ = [
    "FeedRow",
    "IdempotencyClaim",
    "PostgresSpaceStore",
    "PostgresTx",
    "RoomsTx",
    "ParticipantKey",
    "SpaceKey",
    "SpaceStore",
]


@dataclass(frozen=True)
class IdempotencyClaim:
    """The state of an idempotency key after claiming it.

    :ivar new: this call claimed the key and must store its response.
    :ivar fingerprint: the fingerprint stored with the key.
    :ivar response: the stored response, when the first call finished.
    """

    new: bool
    fingerprint: bytes
    response: bytes | None


@dataclass(frozen=True)
class FeedRow:
    """One candidate of a discovery feed.

    :ivar space: the Space.
    :ivar followed: followed users in it, stage first (user id, role).
    """

    space: Space
    followed: tuple[tuple[str, Role], ...]


class RoomsTx(Protocol):
    """One transaction's worth of rooms state."""

    @property
    def conn(self) -> AsyncConnection[Any]:
        """The connection, for the outbox and the live event log."""
        ...

    async def get_space(self, space_id: str, *, lock: bool = False) -> Space | None: ...
    async def insert_space(self, space: Space) -> bool: ...
    async def save_space(self, space: Space) -> None: ...
    async def live_space_of_host(self, host_id: str) -> str | None: ...
    async def count_scheduled(self, host_id: str) -> int: ...
    async def get_participant(self, space_id: str, user_id: str) -> Participant | None: ...
    async def save_participant(self, participant: Participant) -> None: ...
    async def counts(self, space_id: str) -> Counts: ...
    async def co_host_ids(self, space_id: str) -> list[str]: ...
    async def list_participants(
        self,
        space_id: str,
        *,
        roles: Sequence[Role],
        hands_only: bool,
        after: ParticipantKey | None,
        limit: int,
    ) -> list[tuple[Participant, ParticipantKey]]: ...
    async def active_participants(self, space_id: str) -> list[Participant]: ...
    async def deactivate_all(self, space_id: str) -> list[Participant]: ...
    async def unique_participant_count(self, space_id: str) -> int: ...
    async def is_banned(self, space_id: str, user_id: str) -> bool: ...
    async def ban(self, space_id: str, user_id: str, by: str, now: datetime) -> None: ...
    async def is_invited(self, space_id: str, user_id: str) -> bool: ...
    async def invite_count(self, space_id: str) -> int: ...
    async def add_invites(
        self, space_id: str, user_ids: Sequence[str], by: str, now: datetime
    ) -> list[str]: ...
    async def memberships(
        self, user_id: str, space_ids: Sequence[str]
    ) -> tuple[set[str], set[str]]: ...
    async def get_reminder(self, space_id: str, user_id: str) -> datetime | None: ...
    async def add_reminder(self, space_id: str, user_id: str, now: datetime) -> datetime: ...
    async def delete_reminder(self, space_id: str, user_id: str) -> bool: ...
    async def claim_idempotency(
        self, user_id: str, method: str, request_id: str, fingerprint: bytes
    ) -> IdempotencyClaim: ...
    async def lookup_idempotency(
        self, user_id: str, method: str, request_id: str
    ) -> IdempotencyClaim | None: ...
    async def complete_idempotency(
        self, user_id: str, method: str, request_id: str, response: bytes
    ) -> None: ...
    async def set_host_absent(self, space_id: str, since: datetime | None) -> None: ...
    async def purge_idempotency(self, older_than: datetime) -> int: ...
    async def add_report(
        self,
        report_id: str,
        space_id: str,
        reporter_id: str,
        target_user_id: str,
        reason: int,
        note: str,
        context: dict[str, Any],
        now: datetime,
    ) -> str: ...
    async def list_spaces(
        self,
        *,
        host_id: str | None,
        states: Sequence[State],
        after: SpaceKey | None,
        limit: int,
    ) -> list[tuple[Space, SpaceKey]]: ...
    async def feed_candidates(self, followed_ids: Sequence[str], limit: int) -> list[FeedRow]: ...
    async def absent_host_spaces(self, older_than: datetime, limit: int) -> list[Space]: ...
    async def overdue_scheduled(self, older_than: datetime, limit: int) -> list[Space]: ...
    async def stale_disconnected(self, older_than: datetime, limit: int) -> list[Participant]: ...
    async def live_totals(self) -> tuple[int, Counts]: ...
    async def active_count(self, space_id: str, at_most: int) -> int: ...


class SpaceStore(Protocol):
    """Opens units of work."""

    def transaction(self) -> AbstractAsyncContextManager[RoomsTx]:
        """A transaction; committed when the block exits normally."""
        ...


_SPACE_COLUMNS = (
    "id, host_id, title, topics, state, visibility, speak_permission, ticketed, recording,"
    " scheduled_start_time, start_time, end_time, end_reason, create_time, update_time,"
    " pinned_text, pinned_uri, pinned_by, pin_time, captions_available, recording_state,"
    " origin_node, version, recording_name"
)
_SPACE_WIDTH = len(_SPACE_COLUMNS.split(","))
_PARTICIPANT_COLUMNS = (
    "space_id, user_id, role, active, muted, hand_raise_time, captions_enabled, join_time,"
    " role_time, invitation_kind, inviter_id, invitation_time, connected, media_session,"
    " session_time, disconnected_since, revision"
)


# ListSpaces order as a key that only grows: the state's group (live, scheduled, over), then
# microseconds since the epoch (negated where the newest come first), then the id.
_LIST_BUCKET = "(CASE state WHEN 2 THEN 0 WHEN 1 THEN 1 ELSE 2 END)"
_LIST_SORT_KEY = (
    "(CASE WHEN state = 2 THEN -1 WHEN state = 1 THEN 1 ELSE -1 END"
    " * (extract(epoch FROM CASE state WHEN 2 THEN coalesce(start_time, create_time)"
    " WHEN 1 THEN coalesce(scheduled_start_time, create_time)"
    " ELSE coalesce(end_time, update_time) END) * 1000000)::bigint)"
)

SpaceKey = tuple[int, int, str]
"""A Space's position in ListSpaces order: (state group, time key, id)."""

ParticipantKey = tuple[int, int, str]
"""A participant's position in ListParticipants order: (role, join time in microseconds
since the epoch, user id); for raised hands (0, hand raise time, user id)."""


def _participant_key(participant: Participant, hands_only: bool) -> ParticipantKey:
    if hands_only:
        assert participant.hand_raise_time is not None
        return 0, time_key(participant.hand_raise_time), participant.user_id
    return int(participant.role), time_key(participant.join_time), participant.user_id


def _space(row: Sequence[Any]) -> Space:
    pinned = None
    if row[15] is not None or row[16] is not None:
        pinned = Pinned(row[15] or "", row[16] or "", row[17] or "", row[18])
    return Space(
        id=row[0],
        host_id=row[1],
        title=row[2],
        topics=tuple(row[3] or ()),
        state=State(row[4]),
        visibility=Visibility(row[5]),
        speak_permission=SpeakPermission(row[6]),
        ticketed=row[7],
        recording=row[8],
        scheduled_start_time=row[9],
        start_time=row[10],
        end_time=row[11],
        end_reason=EndReason(row[12]),
        create_time=row[13],
        update_time=row[14],
        pinned=pinned,
        captions_available=row[19],
        recording_state=RecordingState(row[20]),
        origin_node=row[21],
        version=row[22],
        recording_name=row[23],
    )


def _participant(row: Sequence[Any]) -> Participant:
    invitation = None
    if row[9]:
        invitation = Invitation(InvitationKind(row[9]), row[10] or "", row[11])
    return Participant(
        space_id=row[0],
        user_id=row[1],
        role=Role(row[2]),
        active=row[3],
        muted=row[4],
        hand_raise_time=row[5],
        captions_enabled=row[6],
        join_time=row[7],
        role_time=row[8],
        invitation=invitation,
        connected=row[12],
        media_session=row[13],
        session_time=row[14],
        disconnected_since=row[15],
        revision=row[16],
    )


def _space_values(space: Space) -> tuple[Any, ...]:
    pinned = space.pinned
    return (
        space.host_id,
        space.title,
        list(space.topics),
        int(space.state),
        int(space.visibility),
        int(space.speak_permission),
        space.ticketed,
        space.recording,
        space.scheduled_start_time,
        space.start_time,
        space.end_time,
        int(space.end_reason),
        space.create_time,
        space.update_time,
        pinned.text if pinned else None,
        pinned.uri if pinned else None,
        pinned.pinned_by if pinned else None,
        pinned.pin_time if pinned else None,
        space.captions_available,
        int(space.recording_state),
        space.origin_node,
        space.version,
        space.recording_name,
        space.id,
    )


class PostgresTx:
    """A :class:`RoomsTx` over one connection inside a transaction."""

    def __init__(self, conn: AsyncConnection[TupleRow]) -> None:
        self._conn = conn

    @property
    def conn(self) -> AsyncConnection[Any]:
        """The connection."""
        return self._conn

    async def _one(self, query: str, params: Sequence[Any]) -> TupleRow | None:
        cursor = await self._conn.execute(query, params)
        return await cursor.fetchone()

    async def _all(self, query: str, params: Sequence[Any]) -> list[TupleRow]:
        cursor = await self._conn.execute(query, params)
        return list(await cursor.fetchall())

    # -- spaces --------------------------------------------------------------------------

    async def get_space(self, space_id: str, *, lock: bool = False) -> Space | None:
        """Read a Space; ``lock`` takes its row lock until commit."""
        suffix = " FOR UPDATE" if lock else ""
        row = await self._one(
            f"SELECT {_SPACE_COLUMNS} FROM spaces WHERE id = %s{suffix}", (space_id,)
        )
        return _space(row) if row else None

    async def insert_space(self, space: Space) -> bool:
        """Insert a new Space; False when the host already has a live one (unique index)."""
        cursor = await self._conn.execute(
            "INSERT INTO spaces (host_id, title, topics, state, visibility, speak_permission,"
            " ticketed, recording, scheduled_start_time, start_time, end_time, end_reason,"
            " create_time, update_time, pinned_text, pinned_uri, pinned_by, pin_time,"
            " captions_available, recording_state, origin_node, version, recording_name, id,"
            " host_absent_since)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
            " %s, %s, %s, %s, %s, %s, CASE WHEN %s::int = 2 THEN %s::timestamptz END)"
            " ON CONFLICT DO NOTHING",
            (*_space_values(space), int(space.state), space.start_time),
        )
        return cursor.rowcount == 1

    async def save_space(self, space: Space) -> None:
        """Write every field of an existing Space."""
        await self._conn.execute(
            "UPDATE spaces SET host_id = %s, title = %s, topics = %s, state = %s,"
            " visibility = %s, speak_permission = %s, ticketed = %s, recording = %s,"
            " scheduled_start_time = %s, start_time = %s, end_time = %s, end_reason = %s,"
            " create_time = %s, update_time = %s, pinned_text = %s, pinned_uri = %s,"
            " pinned_by = %s, pin_time = %s, captions_available = %s, recording_state = %s,"
            " origin_node = %s, version = %s, recording_name = %s WHERE id = %s",
            _space_values(space),
        )

    async def set_host_absent(self, space_id: str, since: datetime | None) -> None:
        """Record since when the host has been away (None: connected)."""
        await self._conn.execute(
            "UPDATE spaces SET host_absent_since = %s WHERE id = %s AND state = 2",
            (since, space_id),
        )

    async def live_space_of_host(self, host_id: str) -> str | None:
        """The host's live Space, if any."""
        row = await self._one("SELECT id FROM spaces WHERE host_id = %s AND state = 2", (host_id,))
        return str(row[0]) if row else None

    async def count_scheduled(self, host_id: str) -> int:
        """The host's scheduled Spaces."""
        row = await self._one(
            "SELECT count(*) FROM spaces WHERE host_id = %s AND state = 1", (host_id,)
        )
        return int(row[0]) if row else 0

    # -- participants ------------------------------------------------------------------------

    async def get_participant(self, space_id: str, user_id: str) -> Participant | None:
        """A participant row (active or not)."""
        row = await self._one(
            f"SELECT {_PARTICIPANT_COLUMNS} FROM participants WHERE space_id = %s AND user_id = %s",
            (space_id, user_id),
        )
        return _participant(row) if row else None

    async def save_participant(self, p: Participant) -> None:
        """Insert or overwrite a participant row."""
        invitation = p.invitation
        await self._conn.execute(
            f"INSERT INTO participants ({_PARTICIPANT_COLUMNS}) VALUES"
            " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (space_id, user_id) DO UPDATE SET role = EXCLUDED.role,"
            " active = EXCLUDED.active, muted = EXCLUDED.muted,"
            " hand_raise_time = EXCLUDED.hand_raise_time,"
            " captions_enabled = EXCLUDED.captions_enabled, join_time = EXCLUDED.join_time,"
            " role_time = EXCLUDED.role_time, invitation_kind = EXCLUDED.invitation_kind,"
            " inviter_id = EXCLUDED.inviter_id, invitation_time = EXCLUDED.invitation_time,"
            " connected = EXCLUDED.connected, media_session = EXCLUDED.media_session,"
            " session_time = EXCLUDED.session_time,"
            " disconnected_since = EXCLUDED.disconnected_since, revision = EXCLUDED.revision",
            (
                p.space_id,
                p.user_id,
                int(p.role),
                p.active,
                p.muted,
                p.hand_raise_time,
                p.captions_enabled,
                p.join_time,
                p.role_time,
                int(invitation.kind) if invitation else 0,
                invitation.inviter_id if invitation else None,
                invitation.create_time if invitation else None,
                p.connected,
                p.media_session,
                p.session_time,
                p.disconnected_since,
                p.revision,
            ),
        )

    async def counts(self, space_id: str) -> Counts:
        """Active participants by role."""
        rows = await self._all(
            "SELECT role, count(*) FROM participants WHERE space_id = %s AND active GROUP BY role",
            (space_id,),
        )
        by_role = {Role(role): int(n) for role, n in rows}
        return Counts(
            by_role.get(Role.HOST, 0),
            by_role.get(Role.CO_HOST, 0),
            by_role.get(Role.SPEAKER, 0),
            by_role.get(Role.LISTENER, 0),
        )

    async def co_host_ids(self, space_id: str) -> list[str]:
        """Current co-hosts in the order they accepted."""
        rows = await self._all(
            "SELECT user_id FROM participants WHERE space_id = %s AND active AND role = 2"
            " ORDER BY role_time, user_id",
            (space_id,),
        )
        return [str(r[0]) for r in rows]

    async def list_participants(
        self,
        space_id: str,
        *,
        roles: Sequence[Role],
        hands_only: bool,
        after: ParticipantKey | None,
        limit: int,
    ) -> list[tuple[Participant, ParticipantKey]]:
        """Active participants by role then join time, or raised hands oldest first, each
        with its position; only those after ``after`` (keyset paging: someone who joins or
        leaves meanwhile never makes the others repeat or go missing)."""
        role_values = [int(r) for r in roles] or [1, 2, 3, 4]
        if hands_only:
            order = "hand_raise_time, user_id"
            hands = " AND hand_raise_time IS NOT NULL AND role = 4"
        else:
            order = "role, join_time, user_id"
            hands = ""
        params: list[Any] = [space_id, role_values]
        position = ""
        if after is not None:
            when = moment_of(after[1])
            if hands_only:
                position = " AND (hand_raise_time, user_id) > (%s, %s)"
                params += [when, after[2]]
            else:
                position = " AND (role, join_time, user_id) > (%s, %s, %s)"
                params += [after[0], when, after[2]]
        rows = await self._all(
            f"SELECT {_PARTICIPANT_COLUMNS} FROM participants WHERE space_id = %s AND active"
            f" AND role = ANY(%s){hands}{position} ORDER BY {order} LIMIT %s",
            (*params, limit),
        )
        listed = [_participant(r) for r in rows]
        return [(p, _participant_key(p, hands_only)) for p in listed]

    async def active_participants(self, space_id: str) -> list[Participant]:
        """Everyone in the Space now."""
        rows = await self._all(
            f"SELECT {_PARTICIPANT_COLUMNS} FROM participants WHERE space_id = %s AND active"
            " ORDER BY role, join_time",
            (space_id,),
        )
        return [_participant(r) for r in rows]

    async def deactivate_all(self, space_id: str) -> list[Participant]:
        """Everyone leaves (the Space ended); returns them as they are after it."""
        rows = await self._all(
            "UPDATE participants SET active = false, connected = false, hand_raise_time = NULL,"
            " invitation_kind = 0, inviter_id = NULL, invitation_time = NULL,"
            " revision = revision + 1"
            f" WHERE space_id = %s AND active RETURNING {_PARTICIPANT_COLUMNS}",
            (space_id,),
        )
        return [_participant(r) for r in rows]

    async def unique_participant_count(self, space_id: str) -> int:
        """Distinct users who ever joined."""
        row = await self._one("SELECT count(*) FROM participants WHERE space_id = %s", (space_id,))
        return int(row[0]) if row else 0

    # -- bans, invites, reminders ------------------------------------------------------------

    async def is_banned(self, space_id: str, user_id: str) -> bool:
        """Removed with block_from_space."""
        row = await self._one(
            "SELECT 1 FROM space_bans WHERE space_id = %s AND user_id = %s", (space_id, user_id)
        )
        return row is not None

    async def ban(self, space_id: str, user_id: str, by: str, now: datetime) -> None:
        """Keep the user out of the Space."""
        await self._conn.execute(
            "INSERT INTO space_bans (space_id, user_id, banned_by, create_time)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (space_id, user_id, by, now),
        )

    async def is_invited(self, space_id: str, user_id: str) -> bool:
        """On the invite list."""
        row = await self._one(
            "SELECT 1 FROM space_invites WHERE space_id = %s AND user_id = %s",
            (space_id, user_id),
        )
        return row is not None

    async def invite_count(self, space_id: str) -> int:
        """Size of the invite list."""
        row = await self._one("SELECT count(*) FROM space_invites WHERE space_id = %s", (space_id,))
        return int(row[0]) if row else 0

    async def add_invites(
        self, space_id: str, user_ids: Sequence[str], by: str, now: datetime
    ) -> list[str]:
        """Add users to the invite list; return those that were not on it."""
        rows = await self._all(
            "INSERT INTO space_invites (space_id, user_id, inviter_id, create_time)"
            " SELECT %s, u, %s, %s FROM unnest(%s::text[]) AS u"
            " ON CONFLICT DO NOTHING RETURNING user_id",
            (space_id, by, now, list(user_ids)),
        )
        return [str(r[0]) for r in rows]

    async def memberships(
        self, user_id: str, space_ids: Sequence[str]
    ) -> tuple[set[str], set[str]]:
        """Of ``space_ids``: those the user is invited to, and those the user is in now."""
        rows = await self._all(
            "SELECT space_id, 'i' FROM space_invites WHERE user_id = %s AND space_id = ANY(%s)"
            " UNION ALL SELECT space_id, 'p' FROM participants"
            " WHERE user_id = %s AND active AND space_id = ANY(%s)",
            (user_id, list(space_ids), user_id, list(space_ids)),
        )
        invited = {str(r[0]) for r in rows if r[1] == "i"}
        present = {str(r[0]) for r in rows if r[1] == "p"}
        return invited, present

    async def get_reminder(self, space_id: str, user_id: str) -> datetime | None:
        """When the user set a reminder for the Space, if they did."""
        row = await self._one(
            "SELECT create_time FROM reminders WHERE space_id = %s AND user_id = %s",
            (space_id, user_id),
        )
        return row[0] if row else None

    async def add_reminder(self, space_id: str, user_id: str, now: datetime) -> datetime:
        """Set a reminder (idempotent); return its creation time."""
        await self._conn.execute(
            "INSERT INTO reminders (space_id, user_id, create_time) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (space_id, user_id, now),
        )
        created = await self.get_reminder(space_id, user_id)
        assert created is not None
        return created

    async def delete_reminder(self, space_id: str, user_id: str) -> bool:
        """Remove a reminder; True when one existed."""
        cursor = await self._conn.execute(
            "DELETE FROM reminders WHERE space_id = %s AND user_id = %s", (space_id, user_id)
        )
        return cursor.rowcount == 1

    # -- idempotency -------------------------------------------------------------------------

    async def claim_idempotency(
        self, user_id: str, method: str, request_id: str, fingerprint: bytes
    ) -> IdempotencyClaim:
        """Claim a key; a concurrent first call holding it makes this wait for its commit."""
        row = await self._one(
            "INSERT INTO idempotency_keys (user_id, method, request_id, fingerprint)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING fingerprint",
            (user_id, method, request_id, fingerprint),
        )
        if row is not None:
            return IdempotencyClaim(True, fingerprint, None)
        row = await self._one(
            "SELECT fingerprint, response FROM idempotency_keys"
            " WHERE user_id = %s AND method = %s AND request_id = %s",
            (user_id, method, request_id),
        )
        assert row is not None
        return IdempotencyClaim(False, bytes(row[0]), bytes(row[1]) if row[1] else None)

    async def lookup_idempotency(
        self, user_id: str, method: str, request_id: str
    ) -> IdempotencyClaim | None:
        """The key's state, without claiming it."""
        row = await self._one(
            "SELECT fingerprint, response FROM idempotency_keys"
            " WHERE user_id = %s AND method = %s AND request_id = %s",
            (user_id, method, request_id),
        )
        if row is None:
            return None
        return IdempotencyClaim(False, bytes(row[0]), bytes(row[1]) if row[1] else None)

    async def complete_idempotency(
        self, user_id: str, method: str, request_id: str, response: bytes
    ) -> None:
        """Store the response of the call that claimed the key."""
        await self._conn.execute(
            "UPDATE idempotency_keys SET response = %s"
            " WHERE user_id = %s AND method = %s AND request_id = %s",
            (response, user_id, method, request_id),
        )

    # -- reports -----------------------------------------------------------------------------

    async def add_report(
        self,
        report_id: str,
        space_id: str,
        reporter_id: str,
        target_user_id: str,
        reason: int,
        note: str,
        context: dict[str, Any],
        now: datetime,
    ) -> str:
        """Store a report; a repeat of the same report returns the first one's id."""
        await self._conn.execute(
            "INSERT INTO reports (id, space_id, reporter_id, target_user_id, reason, note,"
            " context, create_time) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s)"
            " ON CONFLICT DO NOTHING",
            (
                report_id,
                space_id,
                reporter_id,
                target_user_id,
                reason,
                note,
                json.dumps(context),
                now,
            ),
        )
        row = await self._one(
            "SELECT id FROM reports WHERE space_id = %s AND reporter_id = %s"
            " AND target_user_id = %s AND reason = %s",
            (space_id, reporter_id, target_user_id, reason),
        )
        assert row is not None
        return str(row[0])

    # -- lists -------------------------------------------------------------------------------

    async def list_spaces(
        self,
        *,
        host_id: str | None,
        states: Sequence[State],
        after: SpaceKey | None,
        limit: int,
    ) -> list[tuple[Space, SpaceKey]]:
        """Spaces in ListSpaces order (live newest first, scheduled soonest, over latest),
        each with its position; only those after ``after`` (keyset paging: a Space added
        meanwhile never shifts the pages already read)."""
        bucket, key, last_id = after if after is not None else (None, None, None)
        rows = await self._all(
            f"SELECT {_SPACE_COLUMNS}, bucket, sort_key FROM ("
            f"  SELECT {_SPACE_COLUMNS}, {_LIST_BUCKET} AS bucket, {_LIST_SORT_KEY} AS sort_key"
            "   FROM spaces WHERE state = ANY(%s) AND (%s::text IS NULL OR host_id = %s)"
            ") listed"
            " WHERE %s::int IS NULL OR (bucket, sort_key, id) > (%s::int, %s::bigint, %s::text)"
            " ORDER BY bucket, sort_key, id LIMIT %s",
            ([int(s) for s in states], host_id, host_id, bucket, bucket, key, last_id, limit),
        )
        width = _SPACE_WIDTH
        return [(_space(r), (int(r[width]), int(r[width + 1]), str(r[0]))) for r in rows]

    async def feed_candidates(self, followed_ids: Sequence[str], limit: int) -> list[FeedRow]:
        """Live Spaces the followed users host or are in, and their scheduled Spaces.

        One query: the followed ids go in as one array and meet the participant and host
        indexes, whatever their number.
        """
        rows = await self._all(
            f"WITH f AS (SELECT unnest(%s::text[]) AS user_id),"
            " live_in AS ("
            "   SELECT p.space_id, array_agg(p.user_id ORDER BY p.role, p.join_time) AS users,"
            "          array_agg(p.role ORDER BY p.role, p.join_time) AS roles"
            "   FROM participants p JOIN f ON f.user_id = p.user_id"
            "   JOIN spaces s ON s.id = p.space_id AND s.state = 2"
            "   WHERE p.active GROUP BY p.space_id),"
            " candidates AS ("
            "   SELECT id FROM spaces WHERE state IN (1, 2) AND host_id IN (SELECT user_id FROM f)"
            "   UNION SELECT space_id FROM live_in)"
            f" SELECT {', '.join('s.' + c.strip() for c in _SPACE_COLUMNS.split(','))},"
            "   coalesce(l.users, '{}'), coalesce(l.roles, '{}')"
            " FROM candidates c JOIN spaces s ON s.id = c.id"
            " LEFT JOIN live_in l ON l.space_id = s.id"
            " ORDER BY s.state DESC, s.start_time DESC NULLS LAST, s.scheduled_start_time, s.id"
            " LIMIT %s",
            (list(followed_ids), limit),
        )
        result = []
        width = _SPACE_WIDTH
        for row in rows:
            users, roles = row[width], row[width + 1]
            followed = tuple((str(u), Role(r)) for u, r in zip(users, roles, strict=True))
            result.append(FeedRow(_space(row[:width]), followed))
        return result

    # -- sweeper -----------------------------------------------------------------------------

    async def absent_host_spaces(self, older_than: datetime, limit: int) -> list[Space]:
        """Live Spaces whose host has been away since before ``older_than``, locked.

        SKIP LOCKED lets every replica sweep at once: each takes different Spaces.
        """
        rows = await self._all(
            f"SELECT {_SPACE_COLUMNS} FROM spaces WHERE state = 2"
            " AND host_absent_since < %s ORDER BY host_absent_since LIMIT %s"
            " FOR UPDATE SKIP LOCKED",
            (older_than, limit),
        )
        return [_space(r) for r in rows]

    async def overdue_scheduled(self, older_than: datetime, limit: int) -> list[Space]:
        """Scheduled Spaces whose start time passed before ``older_than``, locked."""
        rows = await self._all(
            f"SELECT {_SPACE_COLUMNS} FROM spaces WHERE state = 1"
            " AND scheduled_start_time < %s ORDER BY scheduled_start_time LIMIT %s"
            " FOR UPDATE SKIP LOCKED",
            (older_than, limit),
        )
        return [_space(r) for r in rows]

    async def stale_disconnected(self, older_than: datetime, limit: int) -> list[Participant]:
        """Participants (not hosts) whose connection has been down since before ``older_than``."""
        rows = await self._all(
            f"SELECT {_PARTICIPANT_COLUMNS} FROM participants WHERE active AND role <> 1"
            " AND disconnected_since < %s ORDER BY disconnected_since LIMIT %s"
            " FOR UPDATE SKIP LOCKED",
            (older_than, limit),
        )
        return [_participant(r) for r in rows]

    async def active_count(self, space_id: str, at_most: int) -> int:
        """People in the Space now, counted up to ``at_most`` (so a big Space costs no more)."""
        row = await self._one(
            "SELECT count(*) FROM (SELECT 1 FROM participants WHERE space_id = %s AND active"
            " LIMIT %s) present",
            (space_id, at_most),
        )
        return int(row[0]) if row else 0

    async def live_totals(self) -> tuple[int, Counts]:
        """Live Spaces, and the people in them by role (the metrics' gauges)."""
        row = await self._one("SELECT count(*) FROM spaces WHERE state = 2", ())
        rows = await self._all(
            "SELECT p.role, count(*) FROM participants p JOIN spaces s ON s.id = p.space_id"
            " WHERE s.state = 2 AND p.active GROUP BY p.role",
            (),
        )
        by_role = {Role(role): int(n) for role, n in rows}
        counts = Counts(
            by_role.get(Role.HOST, 0),
            by_role.get(Role.CO_HOST, 0),
            by_role.get(Role.SPEAKER, 0),
            by_role.get(Role.LISTENER, 0),
        )
        return (int(row[0]) if row else 0), counts

    async def purge_idempotency(self, older_than: datetime) -> int:
        """Forget idempotency keys older than ``older_than``."""
        cursor = await self._conn.execute(
            "DELETE FROM idempotency_keys WHERE create_time < %s", (older_than,)
        )
        return cursor.rowcount


class PostgresSpaceStore:
    """The :class:`SpaceStore` over a connection pool whose search_path is ``rooms``.

    :param pool: the pool.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def transaction(self) -> AbstractAsyncContextManager[PostgresTx]:
        """A transaction on a pooled connection."""
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[PostgresTx]:
        async with self._pool.connection() as conn, conn.transaction():
            yield PostgresTx(conn)


IDEMPOTENCY_TTL = timedelta(days=1)
