"""Identity's storage: PostgreSQL tables of the ``identity`` schema.

Every write that others may react to appends its event to the transactional outbox in the
same transaction. Follow counts are kept in step with the edges in that transaction too,
and every change to the edges between two users first locks both user rows in id order,
so counts stay exact and follow/block races serialize, without deadlocks.

Rules that must hold at the moment of a write (may this follow happen?) are passed in as
callbacks from :mod:`services.identity.domain` and run under those locks, so the rule stays
in the domain and the check is atomic with the write.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import psycopg
from psycopg.rows import class_row

from services.common import outbox
from services.common.db import Pool
from services.identity import domain
from services.identity.domain import Edges, Event, FollowState, RefreshStatus, User
from services.identity.keys import KeySchedule, SigningKey

logger = logging.getLogger(__name__)

__all__ = [
    "Credentials",
    "EdgeChange",
    "HandleTaken",
    "IdentityStore",
    "LogoutResult",
    "PostgresIdentityStore",
    "RefreshOutcome",
    "RequestIdTaken",
    "UnknownUser",
]

# Positions of edges are bigint identities: "before the first page" is past the largest.
_END = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a log-in checks."""

    user_id: str
    password_hash: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class RefreshOutcome:
    """What presenting a refresh token did.

    :ivar status: ROTATED when the token was valid and is now spent.
    :ivar user_id: the token's owner (when known).
    :ivar family_id: its family (when known).
    :ivar expire_time: the family's expiry, which the new token inherits.
    """

    status: RefreshStatus
    user_id: str | None = None
    family_id: uuid.UUID | None = None
    expire_time: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class EdgeChange:
    """What a follow or block write did.

    :ivar changed: whether an edge was added or removed (False for a repeated call).
    :ivar edges: the edges between the two users afterwards, from the caller's side, read
        in the same transaction (so the answer needs no second round trip).
    """

    changed: bool
    edges: Edges


@dataclasses.dataclass(frozen=True)
class LogoutResult:
    """What a log-out found: ``owned`` is False for unknown tokens and other users' ones."""

    owned: bool
    revoked_now: int = 0


class HandleTaken(Exception):
    """The handle is in use (ignoring case)."""


class RequestIdTaken(Exception):
    """A CreateUser with this idempotency key committed first."""


class UnknownUser(Exception):
    """A user id does not exist.

    :ivar user_id: the first unknown id.
    """

    def __init__(self, user_id: str) -> None:
        super().__init__(user_id)
        self.user_id = user_id


_USER_COLUMNS = (
    "id",
    "handle",
    "display_name",
    "bio",
    "avatar_uri",
    "follower_count",
    "following_count",
    "create_time",
    "update_time",
)
_SELECT_USER = ", ".join(_USER_COLUMNS)
_SELECT_U = ", ".join(f"u.{c}" for c in _USER_COLUMNS)
# The four edges between users %(a)s and %(b)s, from a's side, in Edges' field order.
_EDGES = """
    EXISTS (SELECT 1 FROM follows WHERE followee_id = %(b)s AND follower_id = %(a)s),
    EXISTS (SELECT 1 FROM follows WHERE followee_id = %(a)s AND follower_id = %(b)s),
    EXISTS (SELECT 1 FROM blocks WHERE blocker_id = %(a)s AND blocked_id = %(b)s),
    EXISTS (SELECT 1 FROM blocks WHERE blocker_id = %(b)s AND blocked_id = %(a)s)"""


class IdentityStore(Protocol):
    """What identity needs from storage; :class:`PostgresIdentityStore` is the real one."""

    async def create_user(
        self,
        user: User,
        password_hash: str,
        request_id: uuid.UUID,
        fingerprint: bytes,
    ) -> User:
        """Insert a user with its idempotency key and UserCreatedEvent.

        :raises HandleTaken: the handle is taken, ignoring case.
        :raises RequestIdTaken: the idempotency key was used first.
        """
        ...

    async def find_create_request(self, request_id: uuid.UUID) -> tuple[bytes, str] | None:
        """The fingerprint and user id a CreateUser idempotency key produced, if any."""
        ...

    async def get_users(self, ids: Sequence[str]) -> dict[str, User]:
        """The users among ``ids`` that exist, by id."""
        ...

    async def get_user_by_handle(self, handle: str) -> User | None:
        """The user with this handle, ignoring case."""
        ...

    async def get_credentials(self, handle: str) -> Credentials | None:
        """The id and password hash of the user with this handle, ignoring case."""
        ...

    async def get_password_hash(self, user_id: str) -> str | None:
        """The password hash of a user."""
        ...

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        """Replace a user's password hash (re-hashing with stronger parameters)."""
        ...

    async def update_user(
        self, user_id: str, changes: dict[str, str], now: dt.datetime
    ) -> User | None:
        """Apply profile ``changes``; ``None`` when the user does not exist."""
        ...

    async def follow(
        self,
        follower_id: str,
        followee_id: str,
        now: dt.datetime,
        check: Callable[[FollowState], None],
    ) -> EdgeChange:
        """Add the edge unless present, after ``check`` approved it under the locks.

        :raises UnknownUser: either user does not exist.
        """
        ...

    async def unfollow(self, follower_id: str, followee_id: str, now: dt.datetime) -> EdgeChange:
        """Remove the edge if present.

        :raises UnknownUser: either user does not exist.
        """
        ...

    async def edges(self, subject_id: str, other_id: str) -> Edges:
        """The edges between two users, from the subject's side."""
        ...

    async def list_followers(
        self, user_id: str, viewer_id: str | None, before: int | None, limit: int
    ) -> list[tuple[int, User]]:
        """Followers of ``user_id``, newest follow first, with each edge's position.

        Users who block ``viewer_id`` are left out (a blocker is hidden from the blocked).
        """
        ...

    async def list_following(
        self, user_id: str, viewer_id: str | None, before: int | None, limit: int
    ) -> list[tuple[int, User]]:
        """Users ``user_id`` follows, newest follow first (blockers of the viewer hidden)."""
        ...

    async def list_blocked(
        self, user_id: str, before: int | None, limit: int
    ) -> list[tuple[int, User]]:
        """Users ``user_id`` blocks, newest block first."""
        ...

    def stream_follower_ids(
        self, user_id: str, after: int, batch_size: int
    ) -> AsyncIterator[tuple[list[str], int]]:
        """Batches of follower ids, oldest follow first, each with its last position."""
        ...

    def stream_following_ids(
        self, user_id: str, after: int, batch_size: int
    ) -> AsyncIterator[tuple[list[str], int]]:
        """Batches of followed ids, oldest follow first, each with its last position."""
        ...

    async def block(self, blocker_id: str, blocked_id: str, now: dt.datetime) -> EdgeChange:
        """Add the block and remove follows both ways.

        :raises UnknownUser: either user does not exist.
        """
        ...

    async def unblock(self, blocker_id: str, blocked_id: str, now: dt.datetime) -> EdgeChange:
        """Remove the block.

        :raises UnknownUser: either user does not exist.
        """
        ...

    async def blocks_among(
        self, user_id: str, others: Sequence[str]
    ) -> dict[str, tuple[bool, bool]]:
        """For each other id: (``user_id`` blocks it, it blocks ``user_id``)."""
        ...

    async def add_refresh_token(
        self,
        token_hash: bytes,
        family_id: uuid.UUID,
        user_id: str,
        now: dt.datetime,
        expire_time: dt.datetime,
    ) -> None:
        """Store the first token of a new family."""
        ...

    async def rotate_refresh_token(
        self, token_hash: bytes, new_hash: bytes, now: dt.datetime
    ) -> RefreshOutcome:
        """Spend a token and store its successor, or report why not (revoking on reuse)."""
        ...

    async def revoke_family(
        self, token_hash: bytes, user_id: str, now: dt.datetime
    ) -> LogoutResult:
        """Revoke the family of a token if it belongs to ``user_id``."""
        ...

    async def load_signing_keys(self, encryption_secret: bytes | None) -> list[SigningKey]:
        """Every stored signing key."""
        ...

    async def add_signing_key(
        self,
        plan: Callable[[list[KeySchedule]], SigningKey | None],
        encryption_secret: bytes | None,
    ) -> SigningKey | None:
        """Store the key ``plan`` makes from the current schedules, if it makes one.

        Replicas call this at once; it runs ``plan`` under a lock, so one key is added.
        """
        ...

    async def delete_signing_keys(self, kids: Sequence[str]) -> int:
        """Delete keys no valid token can carry any more."""
        ...

    async def purge(self, now: dt.datetime, create_request_ttl: dt.timedelta) -> int:
        """Delete expired refresh tokens and old idempotency keys; return rows deleted."""
        ...


class PostgresIdentityStore:
    """:class:`IdentityStore` on PostgreSQL.

    :param pool: a pool whose connections use the identity schema.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    # -- users -------------------------------------------------------------------------

    async def create_user(
        self,
        user: User,
        password_hash: str,
        request_id: uuid.UUID,
        fingerprint: bytes,
    ) -> User:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                async with conn.cursor(row_factory=class_row(User)) as cur:
                    await cur.execute(
                        f"""INSERT INTO users (id, handle, handle_key, display_name, bio,
                                               avatar_uri, password_hash, create_time,
                                               update_time)
                            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                            RETURNING {_SELECT_USER}""",
                        (
                            user.id,
                            user.handle,
                            domain.handle_key(user.handle),
                            user.display_name,
                            user.bio,
                            user.avatar_uri,
                            password_hash,
                            user.create_time,
                            user.update_time,
                        ),
                    )
                    created = await cur.fetchone()
                assert created is not None
                await conn.execute(
                    """INSERT INTO create_requests (request_id, fingerprint, user_id, create_time)
                       VALUES (%s, %s, %s, %s)""",
                    (request_id, fingerprint, user.id, user.create_time),
                )
                await _append(conn, domain.user_created(created))
                return created
        except psycopg.errors.UniqueViolation as error:
            constraint = error.diag.constraint_name
            if constraint == "users_handle_key_unique":
                raise HandleTaken(user.handle) from None
            if constraint == "create_requests_pkey":
                raise RequestIdTaken(str(request_id)) from None
            raise

    async def find_create_request(self, request_id: uuid.UUID) -> tuple[bytes, str] | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT fingerprint, user_id FROM create_requests WHERE request_id = %s",
                (request_id,),
            )
            row = await cur.fetchone()
        return (bytes(row[0]), row[1]) if row else None

    async def get_users(self, ids: Sequence[str]) -> dict[str, User]:
        if not ids:
            return {}
        async with self._pool.connection() as conn:
            async with conn.cursor(row_factory=class_row(User)) as cur:
                await cur.execute(
                    f"SELECT {_SELECT_USER} FROM users WHERE id = ANY(%s)", (list(set(ids)),)
                )
                return {user.id: user for user in await cur.fetchall()}

    async def get_user_by_handle(self, handle: str) -> User | None:
        async with self._pool.connection() as conn:
            async with conn.cursor(row_factory=class_row(User)) as cur:
                await cur.execute(
                    f"SELECT {_SELECT_USER} FROM users WHERE handle_key = %s",
                    (domain.handle_key(handle),),
                )
                return await cur.fetchone()

    async def get_credentials(self, handle: str) -> Credentials | None:
        async with self._pool.connection() as conn:
            async with conn.cursor(row_factory=class_row(Credentials)) as cur:
                await cur.execute(
                    "SELECT id AS user_id, password_hash FROM users WHERE handle_key = %s",
                    (domain.handle_key(handle),),
                )
                return await cur.fetchone()

    async def get_password_hash(self, user_id: str) -> str | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT password_hash FROM users WHERE id = %s", (user_id,))
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE users SET password_hash = %s WHERE id = %s", (password_hash, user_id)
            )

    async def update_user(
        self, user_id: str, changes: dict[str, str], now: dt.datetime
    ) -> User | None:
        allowed = set(domain.UPDATABLE_FIELDS)
        if not changes or not set(changes) <= allowed:
            raise ValueError(f"cannot update {sorted(set(changes) - allowed) or 'nothing'}")
        # Column names come from the fixed allow-list above, never from the request.
        assignments = ", ".join(f"{column} = %({column})s" for column in sorted(changes))
        async with self._pool.connection() as conn:
            async with conn.cursor(row_factory=class_row(User)) as cur:
                await cur.execute(
                    f"""UPDATE users SET {assignments}, update_time = %(now)s
                        WHERE id = %(id)s RETURNING {_SELECT_USER}""",
                    {**changes, "id": user_id, "now": now},
                )
                return await cur.fetchone()

    # -- follow graph ------------------------------------------------------------------

    async def follow(
        self,
        follower_id: str,
        followee_id: str,
        now: dt.datetime,
        check: Callable[[FollowState], None],
    ) -> EdgeChange:
        async with self._pool.connection() as conn, conn.transaction():
            await _lock_users(conn, follower_id, followee_id)
            cur = await conn.execute(
                f"SELECT {_EDGES}, (SELECT following_count FROM users WHERE id = %(a)s)",
                {"a": follower_id, "b": followee_id},
            )
            row = await cur.fetchone()
            assert row is not None
            state = FollowState(Edges(*row[:4]), following_count=row[4])
            check(state)
            after = dataclasses.replace(state.edges, following=True)
            if state.edges.following:
                return EdgeChange(False, after)
            await conn.execute(
                "INSERT INTO follows (followee_id, follower_id, create_time) VALUES (%s, %s, %s)",
                (followee_id, follower_id, now),
            )
            await _adjust_counts(conn, follower_id, followee_id, +1)
            await _append(conn, domain.user_followed(follower_id, followee_id, now))
            return EdgeChange(True, after)

    async def unfollow(self, follower_id: str, followee_id: str, now: dt.datetime) -> EdgeChange:
        async with self._pool.connection() as conn, conn.transaction():
            await _lock_users(conn, follower_id, followee_id)
            removed = await _delete_edges(conn, [(follower_id, followee_id)], now)
            return EdgeChange(bool(removed), await _read_edges(conn, follower_id, followee_id))

    async def edges(self, subject_id: str, other_id: str) -> Edges:
        async with self._pool.connection() as conn:
            return await _read_edges(conn, subject_id, other_id)

    async def list_followers(
        self, user_id: str, viewer_id: str | None, before: int | None, limit: int
    ) -> list[tuple[int, User]]:
        return await self._list_edges(
            "follows", "followee_id", "follower_id", user_id, viewer_id, before, limit
        )

    async def list_following(
        self, user_id: str, viewer_id: str | None, before: int | None, limit: int
    ) -> list[tuple[int, User]]:
        return await self._list_edges(
            "follows", "follower_id", "followee_id", user_id, viewer_id, before, limit
        )

    async def list_blocked(
        self, user_id: str, before: int | None, limit: int
    ) -> list[tuple[int, User]]:
        return await self._list_edges(
            "blocks", "blocker_id", "blocked_id", user_id, None, before, limit
        )

    async def _list_edges(
        self,
        table: str,
        owner_column: str,
        other_column: str,
        user_id: str,
        viewer_id: str | None,
        before: int | None,
        limit: int,
    ) -> list[tuple[int, User]]:
        """One page of one side of an edge table, newest edge first (keyset on ``seq``).

        Table and column names come from the fixed calls above, never from a request.
        """
        hide_blockers_of_viewer = (
            f"""AND NOT EXISTS (SELECT 1 FROM blocks hidden
                                WHERE hidden.blocker_id = e.{other_column}
                                  AND hidden.blocked_id = %(viewer)s)"""
            if viewer_id is not None
            else ""
        )
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"""SELECT e.seq, {_SELECT_U}
                    FROM {table} e JOIN users u ON u.id = e.{other_column}
                    WHERE e.{owner_column} = %(owner)s AND e.seq < %(before)s
                    {hide_blockers_of_viewer}
                    ORDER BY e.seq DESC
                    LIMIT %(limit)s""",
                {
                    "owner": user_id,
                    "viewer": viewer_id,
                    "before": _END if before is None else before,
                    "limit": limit,
                },
            )
            rows = await cur.fetchall()
        return [(row[0], User(*row[1:])) for row in rows]

    def stream_follower_ids(
        self, user_id: str, after: int, batch_size: int
    ) -> AsyncIterator[tuple[list[str], int]]:
        return self._stream_ids("followee_id", "follower_id", user_id, after, batch_size)

    def stream_following_ids(
        self, user_id: str, after: int, batch_size: int
    ) -> AsyncIterator[tuple[list[str], int]]:
        return self._stream_ids("follower_id", "followee_id", user_id, after, batch_size)

    async def _stream_ids(
        self, owner_column: str, other_column: str, user_id: str, after: int, batch_size: int
    ) -> AsyncIterator[tuple[list[str], int]]:
        """Yield ids in follow order, ``batch_size`` at a time, after position ``after``.

        Each batch is one range scan of the ``(owner, seq) INCLUDE (other)`` index (keyset,
        never OFFSET, so the millionth id costs what the first does). PostgreSQL joins a
        batch into one string that Python splits in C: a million ids cost one row per
        batch to decode instead of a million. A connection is held only while a batch is
        read, so a slow consumer never pins one.
        """
        query = f"""SELECT string_agg(batch.{other_column}, ' ' ORDER BY batch.seq),
                           max(batch.seq)
                    FROM (SELECT seq, {other_column} FROM follows
                          WHERE {owner_column} = %s AND seq > %s
                          ORDER BY seq LIMIT %s) AS batch"""
        position = after
        while True:
            async with self._pool.connection() as conn:
                cur = await conn.execute(query, (user_id, position, batch_size))
                row = await cur.fetchone()
            if row is None or row[0] is None:
                return
            ids: list[str] = row[0].split(" ")
            position = row[1]
            yield ids, position
            if len(ids) < batch_size:
                return

    # -- blocks ------------------------------------------------------------------------

    async def block(self, blocker_id: str, blocked_id: str, now: dt.datetime) -> EdgeChange:
        async with self._pool.connection() as conn, conn.transaction():
            await _lock_users(conn, blocker_id, blocked_id)
            cur = await conn.execute(
                """INSERT INTO blocks (blocker_id, blocked_id, create_time) VALUES (%s, %s, %s)
                   ON CONFLICT DO NOTHING""",
                (blocker_id, blocked_id, now),
            )
            changed = cur.rowcount > 0
            if changed:
                # Blocking cuts the follow edges both ways (each announced as an unfollow).
                pairs = [(blocker_id, blocked_id), (blocked_id, blocker_id)]
                await _delete_edges(conn, pairs, now)
                await _append(conn, domain.user_blocked(blocker_id, blocked_id, now))
            return EdgeChange(changed, await _read_edges(conn, blocker_id, blocked_id))

    async def unblock(self, blocker_id: str, blocked_id: str, now: dt.datetime) -> EdgeChange:
        async with self._pool.connection() as conn, conn.transaction():
            await _lock_users(conn, blocker_id, blocked_id)
            cur = await conn.execute(
                "DELETE FROM blocks WHERE blocker_id = %s AND blocked_id = %s",
                (blocker_id, blocked_id),
            )
            changed = cur.rowcount > 0
            if changed:
                await _append(conn, domain.user_unblocked(blocker_id, blocked_id, now))
            return EdgeChange(changed, await _read_edges(conn, blocker_id, blocked_id))

    async def blocks_among(
        self, user_id: str, others: Sequence[str]
    ) -> dict[str, tuple[bool, bool]]:
        result = {other: (False, False) for other in others}
        if not others:
            return result
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """SELECT blocker_id, blocked_id FROM blocks
                   WHERE (blocker_id = %(u)s AND blocked_id = ANY(%(o)s))
                      OR (blocked_id = %(u)s AND blocker_id = ANY(%(o)s))""",
                {"u": user_id, "o": list(others)},
            )
            for blocker, blocked in await cur.fetchall():
                if blocker == user_id:
                    _, blocked_by = result[blocked]
                    result[blocked] = (True, blocked_by)
                else:
                    blocking, _ = result[blocker]
                    result[blocker] = (blocking, True)
        return result

    # -- refresh tokens ----------------------------------------------------------------

    async def add_refresh_token(
        self,
        token_hash: bytes,
        family_id: uuid.UUID,
        user_id: str,
        now: dt.datetime,
        expire_time: dt.datetime,
    ) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                """INSERT INTO refresh_tokens
                     (token_hash, family_id, user_id, issue_time, expire_time)
                   VALUES (%s, %s, %s, %s, %s)""",
                (token_hash, family_id, user_id, now, expire_time),
            )

    async def rotate_refresh_token(
        self, token_hash: bytes, new_hash: bytes, now: dt.datetime
    ) -> RefreshOutcome:
        async with self._pool.connection() as conn, conn.transaction():
            # FOR UPDATE: two refreshes racing with one token serialize here, and the
            # second finds it spent (reuse), as a thief's replay would.
            cur = await conn.execute(
                """SELECT family_id, user_id, expire_time, spent_time, revoke_time
                   FROM refresh_tokens WHERE token_hash = %s FOR UPDATE""",
                (token_hash,),
            )
            row = await cur.fetchone()
            if row is None:
                return RefreshOutcome(RefreshStatus.UNKNOWN)
            family_id, user_id, expire_time, spent_time, revoke_time = row
            if spent_time is not None:
                await conn.execute(
                    """UPDATE refresh_tokens SET revoke_time = %s
                       WHERE family_id = %s AND revoke_time IS NULL""",
                    (now, family_id),
                )
                return RefreshOutcome(RefreshStatus.REUSED, user_id, family_id, expire_time)
            if revoke_time is not None:
                return RefreshOutcome(RefreshStatus.REVOKED, user_id, family_id, expire_time)
            if expire_time <= now:
                return RefreshOutcome(RefreshStatus.EXPIRED, user_id, family_id, expire_time)
            await conn.execute(
                "UPDATE refresh_tokens SET spent_time = %s WHERE token_hash = %s",
                (now, token_hash),
            )
            await conn.execute(
                """INSERT INTO refresh_tokens
                     (token_hash, family_id, user_id, issue_time, expire_time)
                   VALUES (%s, %s, %s, %s, %s)""",
                (new_hash, family_id, user_id, now, expire_time),
            )
            return RefreshOutcome(RefreshStatus.ROTATED, user_id, family_id, expire_time)

    async def revoke_family(
        self, token_hash: bytes, user_id: str, now: dt.datetime
    ) -> LogoutResult:
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT family_id, user_id FROM refresh_tokens WHERE token_hash = %s",
                (token_hash,),
            )
            row = await cur.fetchone()
            if row is None or row[1] != user_id:
                return LogoutResult(owned=False)
            cur = await conn.execute(
                """UPDATE refresh_tokens SET revoke_time = %s
                   WHERE family_id = %s AND revoke_time IS NULL""",
                (now, row[0]),
            )
            return LogoutResult(owned=True, revoked_now=cur.rowcount)

    # -- signing keys ------------------------------------------------------------------

    async def load_signing_keys(self, encryption_secret: bytes | None) -> list[SigningKey]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT kid, private_pem, create_time, activate_time FROM signing_keys"
            )
            rows = await cur.fetchall()
        return [
            SigningKey.from_pem(kid, bytes(pem), encryption_secret, created, activates)
            for kid, pem, created, activates in rows
        ]

    async def add_signing_key(
        self,
        plan: Callable[[list[KeySchedule]], SigningKey | None],
        encryption_secret: bytes | None,
    ) -> SigningKey | None:
        async with self._pool.connection() as conn, conn.transaction():
            # Replicas check at the same moments; the lock makes them add one key, not one
            # each. Released at commit.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('identity.signing_keys', 0))"
            )
            cur = await conn.execute("SELECT kid, create_time, activate_time FROM signing_keys")
            schedules = [KeySchedule(*row) for row in await cur.fetchall()]
            key = plan(schedules)
            if key is None:
                return None
            await conn.execute(
                """INSERT INTO signing_keys (kid, private_pem, create_time, activate_time)
                   VALUES (%s, %s, %s, %s)""",
                (key.kid, key.private_pem(encryption_secret), key.created_at, key.activate_at),
            )
            return key

    async def delete_signing_keys(self, kids: Sequence[str]) -> int:
        if not kids:
            return 0
        async with self._pool.connection() as conn:
            cur = await conn.execute("DELETE FROM signing_keys WHERE kid = ANY(%s)", (list(kids),))
            return cur.rowcount

    # -- housekeeping ------------------------------------------------------------------

    async def purge(self, now: dt.datetime, create_request_ttl: dt.timedelta) -> int:
        async with self._pool.connection() as conn:
            tokens = await conn.execute("DELETE FROM refresh_tokens WHERE expire_time < %s", (now,))
            requests = await conn.execute(
                "DELETE FROM create_requests WHERE create_time < %s", (now - create_request_ttl,)
            )
            return tokens.rowcount + requests.rowcount


async def _append(conn: psycopg.AsyncConnection[Any], event: Event) -> None:
    await outbox.append(conn, event.event_type, event.key, event.payload)


async def _read_edges(conn: psycopg.AsyncConnection[Any], subject_id: str, other_id: str) -> Edges:
    cur = await conn.execute(f"SELECT {_EDGES}", {"a": subject_id, "b": other_id})
    row = await cur.fetchone()
    assert row is not None
    return Edges(*row)


async def _lock_users(conn: psycopg.AsyncConnection[Any], *user_ids: str) -> None:
    """Lock the users' rows in id order (one order everywhere: no deadlocks).

    :raises UnknownUser: naming the first missing id in the order given.
    """
    cur = await conn.execute(
        "SELECT id FROM users WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (sorted(user_ids),)
    )
    found = {row[0] for row in await cur.fetchall()}
    for user_id in user_ids:
        if user_id not in found:
            raise UnknownUser(user_id)


async def _adjust_counts(
    conn: psycopg.AsyncConnection[Any], follower_id: str, followee_id: str, delta: int
) -> None:
    await conn.execute(
        """UPDATE users SET
             following_count = following_count
                               + CASE WHEN id = %(follower)s THEN %(delta)s ELSE 0 END,
             follower_count = follower_count
                              + CASE WHEN id = %(followee)s THEN %(delta)s ELSE 0 END
           WHERE id IN (%(follower)s, %(followee)s)""",
        {"follower": follower_id, "followee": followee_id, "delta": delta},
    )


async def _delete_edges(
    conn: psycopg.AsyncConnection[Any], edges: Sequence[tuple[str, str]], now: dt.datetime
) -> int:
    """Delete follow edges ``(follower, followee)``, adjusting counts and emitting unfollows.

    The caller holds the locks of both users of every edge.
    """
    removed = 0
    for follower_id, followee_id in edges:
        cur = await conn.execute(
            "DELETE FROM follows WHERE followee_id = %s AND follower_id = %s",
            (followee_id, follower_id),
        )
        if cur.rowcount:
            removed += 1
            await _adjust_counts(conn, follower_id, followee_id, -1)
            await _append(conn, domain.user_unfollowed(follower_id, followee_id, now))
    return removed
