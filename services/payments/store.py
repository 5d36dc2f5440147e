"""Payments' storage: PostgreSQL tables of the ``payments`` schema.

Every change that moves money books its balanced journal entry, its outbox event and (for
requests with an idempotency key) the final response in one transaction, so a crash
leaves either all of it or none. Facts are booked at most once twice over: state changes
are conditional (``WHERE state = ...``) and journal entries carry a unique ``dedupe_key``.
Debits of a user's available balance take a transaction-scoped advisory lock per user,
so two concurrent debits cannot both pass the balance check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import psycopg
from google.protobuf import message as pb_message
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from services.common import outbox
from services.common.db import Pool
from services.common.errors import FailedPrecondition, Internal
from services.common.ids import new_id
from services.payments import ledger
from services.payments.domain import (
    JournalEntry,
    Offering,
    OfferingState,
    Posting,
    SpaceFacts,
    SpaceState,
    UserAccount,
    account,
    advances,
)
from services.payments.ledger import BooksReport

logger = logging.getLogger(__name__)

__all__ = [
    "Claim",
    "ClaimStatus",
    "EntryRecord",
    "Event",
    "IdemDone",
    "PaymentsStore",
    "PayoutRecord",
    "PostgresPaymentsStore",
    "ReserveOutcome",
    "Settlement",
    "TicketRecord",
    "TipRecord",
]


@dataclasses.dataclass(frozen=True)
class Event:
    """An event to append to the outbox with a write."""

    event_type: str
    key: str
    payload: pb_message.Message


@dataclasses.dataclass(frozen=True)
class IdemDone:
    """The final response of an idempotent request, written with the change it made."""

    scope: str
    request_id: uuid.UUID
    response: bytes


class ClaimStatus(enum.StrEnum):
    """What claiming an idempotency key found."""

    NEW = "new"  # first use: run the request
    RESUMED = "resumed"  # an earlier attempt stopped before a final outcome: run it again
    DONE = "done"  # final outcome recorded: answer it
    MISMATCH = "mismatch"  # the key was used for a different request
    BUSY = "busy"  # another attempt holds the lease right now


@dataclasses.dataclass(frozen=True)
class Claim:
    """The state of an idempotency key after :meth:`PaymentsStore.claim`."""

    status: ClaimStatus
    response: bytes | None = None
    error_code: str | None = None
    error_reason: str | None = None
    error_message: str | None = None


@dataclasses.dataclass(frozen=True)
class TicketRecord:
    id: str
    space_id: str
    owner_id: str
    host_id: str
    price_minor: int
    fee_minor: int
    currency_code: str
    state: str
    refund_reason: str | None
    refund_note: str
    request_scope: str
    request_id: uuid.UUID
    processor_key: str
    charge_id: str | None
    settled: bool
    create_time: dt.datetime
    refund_time: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class TipRecord:
    id: str
    space_id: str
    sender_id: str
    recipient_id: str
    amount_minor: int
    fee_minor: int
    currency_code: str
    message: str
    state: str
    request_scope: str
    request_id: uuid.UUID
    processor_key: str
    charge_id: str | None
    settled: bool
    create_time: dt.datetime


@dataclasses.dataclass(frozen=True)
class PayoutRecord:
    id: str
    user_id: str
    amount_minor: int
    currency_code: str
    state: str
    failure_reason: str
    request_id: uuid.UUID
    create_time: dt.datetime
    complete_time: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class EntryRecord:
    id: str
    kind: str
    subject: str
    description: str
    create_time: dt.datetime
    postings: tuple[Posting, ...]


@dataclasses.dataclass(frozen=True)
class Settlement:
    space_id: str
    amounts: dict[str, int]
    settle_time: dt.datetime


class ReserveOutcome(enum.StrEnum):
    """Why a seat could not be reserved (read under the offering's row lock)."""

    RESERVED = "reserved"
    MISSING = "missing"
    CLOSED = "closed"
    PRICE_CHANGED = "price_changed"
    SOLD_OUT = "sold_out"
    ALREADY_OWNED = "already_owned"


# Bookkeeping statements that need no fsync of their own commit: an idempotency row that a
# crash loses is re-claimed by the retry, and any later money-moving transaction (which
# commits synchronously) flushes the WAL up to and including it. The setting is local to
# the statement's own (autocommit) transaction, so it is still in force at its commit.
_ASYNC_COMMIT = "(SELECT set_config('synchronous_commit', 'off', true)) async_commit"

_TICKET_COLUMNS = (
    "id, space_id, owner_id, host_id, price_minor, fee_minor, currency_code, state,"
    " refund_reason, refund_note, request_scope, request_id, processor_key, charge_id,"
    " settled, create_time, refund_time"
)
_TIP_COLUMNS = (
    "id, space_id, sender_id, recipient_id, amount_minor, fee_minor, currency_code, message,"
    " state, request_scope, request_id, processor_key, charge_id, settled, create_time"
)
_PAYOUT_COLUMNS = (
    "id, user_id, amount_minor, currency_code, state, failure_reason, request_id,"
    " create_time, complete_time"
)
_OFFERING_COLUMNS = (
    "space_id, host_id, price_minor, currency_code, capacity, sold_count, reserved_count,"
    " sales_end_time, state, create_time, update_time"
)


def _offering(row: dict[str, Any]) -> Offering:
    return Offering(**{**row, "state": OfferingState(row["state"])})


def _space(row: dict[str, Any]) -> SpaceFacts:
    return SpaceFacts(
        id=row["id"],
        host_id=row["host_id"],
        state=SpaceState(row["state"]),
        scheduled_start_time=row["scheduled_start_time"],
    )


class InsufficientBalance(FailedPrecondition):
    """The available balance does not cover a debit."""

    default_reason = "INSUFFICIENT_BALANCE"


class PaymentsStore(Protocol):
    """What payments needs from storage; :class:`PostgresPaymentsStore` is the real one."""

    async def check_books(self) -> BooksReport:
        """Run the ledger invariant check."""
        ...

    async def claim(
        self,
        scope: str,
        request_id: uuid.UUID,
        operation: str,
        fingerprint: bytes,
        lease_s: float,
    ) -> Claim:
        """Take an idempotency key for a request, or report what it already holds."""
        ...

    async def fail_request(
        self, scope: str, request_id: uuid.UUID, code: str, reason: str, message: str
    ) -> None:
        """Record a final refusal under the key (repeats get the same refusal)."""
        ...

    async def complete_request(self, scope: str, request_id: uuid.UUID, response: bytes) -> None:
        """Record a success under the key unless the change's transaction already did."""
        ...

    async def take_over(self, scope: str, request_id: uuid.UUID, lease_s: float) -> bool:
        """Take a pending key whose lease ran out (a background job finishing the request)."""
        ...

    async def release_request(self, scope: str, request_id: uuid.UUID) -> None:
        """End the lease of a request that stopped without a final outcome."""
        ...

    async def delete_expired_requests(self, older_than: dt.datetime) -> int:
        """Forget idempotency keys created before ``older_than``; return how many."""
        ...

    async def get_space(self, space_id: str) -> SpaceFacts | None:
        """What the projection knows of a Space."""
        ...

    async def event_processed(self, event_id: uuid.UUID) -> bool:
        """Whether a rooms event was fully applied already."""
        ...

    async def mark_processed(self, event_id: uuid.UUID, event_type: str) -> None:
        """Record that a rooms event's effects are all done."""
        ...

    async def forget_processed_events(self, older_than: dt.datetime) -> int:
        """Drop dedupe records older than any redelivery."""
        ...

    async def project_space(
        self,
        space_id: str,
        host_id: str,
        state: SpaceState,
        scheduled_start_time: dt.datetime | None,
        *,
        reschedule: bool = False,
    ) -> SpaceState:
        """Apply a Space's new facts (states only move forward); return the state after."""
        ...

    async def get_offering(self, space_id: str) -> Offering | None:
        """The Space's ticket offering, if it has one."""
        ...

    async def get_offering_and_space(
        self, space_id: str
    ) -> tuple[Offering | None, SpaceFacts | None]:
        """The offering and the Space's facts in one round trip (the purchase hot path)."""
        ...

    async def create_offering(self, offering: Offering, done: IdemDone | None) -> bool:
        """Insert an offering; ``False`` when the Space has one already."""
        ...

    async def update_offering(
        self,
        space_id: str,
        check: Callable[[Offering], Offering],
    ) -> Offering | None:
        """Change an offering under its row lock: ``check`` refuses or returns the new one."""
        ...

    async def reserve_seat(
        self, ticket: TicketRecord, price_minor: int, currency_code: str
    ) -> tuple[ReserveOutcome, TicketRecord | None]: ...

    async def find_ticket_by_request(
        self, scope: str, request_id: uuid.UUID
    ) -> TicketRecord | None:
        """The ticket a purchase request made (reserved or further), if any."""
        ...

    async def get_ticket(self, space_id: str, ticket_id: str) -> TicketRecord | None:
        """A ticket that exists for its owner (reserved seats are not tickets yet)."""
        ...

    async def valid_ticket(self, space_id: str, user_id: str) -> TicketRecord | None:
        """The user's paid ticket for the Space, if any."""
        ...

    async def list_tickets(
        self,
        *,
        space_id: str | None,
        owner_id: str | None,
        state: str | None,
        before: str | None,
        limit: int,
    ) -> list[TicketRecord]:
        """Tickets newest first (by id), filtered; reserved seats are never listed."""
        ...

    async def release_seat(self, ticket_id: str) -> None:
        """Give back a reserved seat whose charge did not happen."""
        ...

    async def confirm_ticket(
        self,
        space_id: str,
        ticket_id: str,
        charge_id: str,
        entry: JournalEntry,
        make_event: Callable[[int], Event],
        done: IdemDone | None,
        late_settlement: JournalEntry | None,
    ) -> tuple[TicketRecord, OfferingState]:
        """Turn a reserved seat into a paid ticket with its sale entry and event."""
        ...

    async def stale_reservations(self, older_than: dt.datetime, limit: int) -> list[TicketRecord]:
        """Reserved seats whose purchase stopped before an outcome (crash, lost answer)."""
        ...

    async def begin_refund(
        self,
        space_id: str,
        ticket_id: str,
        reason: str,
        note: str,
        make_entry: Callable[[TicketRecord], JournalEntry],
    ) -> tuple[TicketRecord, bool]:
        """Invalidate a paid ticket and book its refund entry, in one transaction."""
        ...

    async def complete_refund(
        self, ticket_id: str, now: dt.datetime, make_event: Callable[[TicketRecord], Event]
    ) -> tuple[TicketRecord, bool]:
        """Mark a refund confirmed by the processor; return the ticket and whether this did."""
        ...

    async def tickets_to_refund(self, space_id: str, limit: int) -> list[TicketRecord]:
        """Valid or refund-pending tickets of a Space, oldest first."""
        ...

    async def count_unrefunded(self, space_id: str) -> int:
        """Tickets of a Space still to refund (reserved seats included: they may be paid)."""
        ...

    async def pending_refunds(self, limit: int) -> list[TicketRecord]:
        """Refunds started and not confirmed (a crash or a processor outage in between)."""
        ...

    async def canceled_with_tickets(self, limit: int) -> list[str]:
        """Canceled offerings that still have valid tickets."""
        ...

    async def cancel_offering(self, space_id: str) -> OfferingState | None:
        """Stop sales of a canceled Space; return the offering's state after (or ``None``)."""
        ...

    async def get_settlement(self, space_id: str) -> Settlement | None: ...

    async def settle(
        self,
        space_id: str,
        now: dt.datetime,
        make_entry: Callable[[str, str, int], JournalEntry],
    ) -> Settlement:
        """Release a Space's held revenue (tickets and tips) to its payees' available."""
        ...

    async def find_tip_by_request(self, scope: str, request_id: uuid.UUID) -> TipRecord | None: ...

    async def begin_tip(self, tip: TipRecord) -> TipRecord:
        """Record a tip about to be charged (or return the one this request recorded)."""
        ...

    async def drop_tip(self, tip_id: str) -> None:
        """Forget a pending tip whose charge did not happen."""
        ...

    async def stale_tips(self, older_than: dt.datetime, limit: int) -> list[TipRecord]:
        """Pending tips whose request stopped before an outcome."""
        ...

    async def book_tip(
        self,
        tip: TipRecord,
        charge_id: str,
        entry: JournalEntry,
        event: Event,
        done: IdemDone | None,
        late_settlement: JournalEntry,
    ) -> TipRecord:
        """Mark a pending tip paid with its entry and event."""
        ...

    async def request_payout(
        self, payout: PayoutRecord, entry: JournalEntry, done: IdemDone | None
    ) -> PayoutRecord:
        """Reserve a payout's amount out of available."""
        ...

    async def find_payout_by_request(
        self, user_id: str, request_id: uuid.UUID
    ) -> PayoutRecord | None: ...

    async def get_payout(self, user_id: str, payout_id: str) -> PayoutRecord | None: ...

    async def list_payouts(
        self, user_id: str, before: str | None, limit: int
    ) -> list[PayoutRecord]: ...

    async def pending_payouts(self, limit: int) -> list[PayoutRecord]: ...

    async def complete_payout(
        self,
        payout_id: str,
        paid: bool,
        failure_reason: str,
        now: dt.datetime,
        entry: JournalEntry,
        make_event: Callable[[PayoutRecord], Event],
    ) -> PayoutRecord | None:
        """Record the processor's outcome of a pending payout; ``None`` if already done."""
        ...

    async def balances(self, user_id: str) -> dict[str, dict[str, int]]:
        """A user's account balances: currency -> account suffix -> amount."""
        ...

    async def ledger_entries(
        self, user_id: str, before: str | None, limit: int
    ) -> list[EntryRecord]:
        """Entries touching a user's accounts, newest first (ids are time-ordered)."""
        ...


def _idem_sql_done() -> str:
    return (
        "UPDATE idempotency_keys SET state = 'done', response = %s"
        " WHERE scope = %s AND request_id = %s"
    )


class PostgresPaymentsStore:
    """:class:`PaymentsStore` on PostgreSQL.

    :param pool: a pool whose ``search_path`` is the payments schema.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    @property
    def pool(self) -> Pool:
        """The pool (the sandbox processor and the ledger check share it)."""
        return self._pool

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection in autocommit mode.

        A lone statement then costs one round trip instead of three (BEGIN, statement,
        COMMIT), which is most of a sold-out purchase; writes that must be atomic still
        run inside ``conn.transaction()``.
        """
        async with self._pool.connection() as conn:
            if not conn.autocommit:
                await conn.set_autocommit(True)
            yield conn

    # -- idempotency -------------------------------------------------------------------

    async def claim(
        self,
        scope: str,
        request_id: uuid.UUID,
        operation: str,
        fingerprint: bytes,
        lease_s: float,
    ) -> Claim:
        """See :meth:`PaymentsStore.claim`."""
        lease = dt.timedelta(seconds=lease_s)
        async with self._connection() as conn:
            # The common case, a new key, is this one statement.
            cursor = await conn.execute(
                "INSERT INTO idempotency_keys (scope, request_id, operation, fingerprint,"
                " state, lease_until) SELECT %s, %s, %s, %s, 'pending', now() + %s"
                f" FROM {_ASYNC_COMMIT} ON CONFLICT DO NOTHING RETURNING 1",
                (scope, request_id, operation, fingerprint, lease),
            )
            if await cursor.fetchone() is not None:
                return Claim(ClaimStatus.NEW)
            return await self._existing_claim(
                conn, scope, request_id, operation, fingerprint, lease
            )

    @staticmethod
    async def _existing_claim(
        conn: AsyncConnection[Any],
        scope: str,
        request_id: uuid.UUID,
        operation: str,
        fingerprint: bytes,
        lease: dt.timedelta,
    ) -> Claim:
        async with conn.transaction():
            cursor = await conn.execute(
                "SELECT operation, fingerprint, state, lease_until < now(), response,"
                " error_code, error_reason, error_message FROM idempotency_keys"
                " WHERE scope = %s AND request_id = %s FOR UPDATE",
                (scope, request_id),
            )
            row = await cursor.fetchone()
            if row is None:  # expired and deleted between the two statements
                return Claim(ClaimStatus.BUSY)
            op, stored_fp, state, expired, response, code, reason, message = row
            if op != operation or bytes(stored_fp) != fingerprint:
                return Claim(ClaimStatus.MISMATCH)
            if state == "done":
                return Claim(
                    ClaimStatus.DONE,
                    response=bytes(response) if response is not None else None,
                    error_code=code,
                    error_reason=reason,
                    error_message=message,
                )
            if not expired:
                return Claim(ClaimStatus.BUSY)
            await conn.execute(
                "UPDATE idempotency_keys SET lease_until = now() + %s"
                " WHERE scope = %s AND request_id = %s",
                (lease, scope, request_id),
            )
            return Claim(ClaimStatus.RESUMED)

    async def fail_request(
        self, scope: str, request_id: uuid.UUID, code: str, reason: str, message: str
    ) -> None:
        """See :meth:`PaymentsStore.fail_request`."""
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE idempotency_keys SET state = 'done', error_code = %s,"
                f" error_reason = %s, error_message = %s FROM {_ASYNC_COMMIT}"
                " WHERE scope = %s AND request_id = %s AND state = 'pending'",
                (code, reason, message, scope, request_id),
            )

    async def complete_request(self, scope: str, request_id: uuid.UUID, response: bytes) -> None:
        """Record a success under the key unless the change's transaction already did."""
        async with self._connection() as conn:
            await conn.execute(
                f"UPDATE idempotency_keys SET state = 'done', response = %s FROM {_ASYNC_COMMIT}"
                " WHERE scope = %s AND request_id = %s AND state = 'pending'",
                (response, scope, request_id),
            )

    async def take_over(self, scope: str, request_id: uuid.UUID, lease_s: float) -> bool:
        """Take a pending key whose lease ran out (a background job finishing the request).

        :return: ``False`` while an attempt holds the lease or the outcome is final; ``True``
            also when the key is gone (expired), since nothing can run under it any more.
        """
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT state = 'pending' AND lease_until < now() FROM idempotency_keys"
                " WHERE scope = %s AND request_id = %s",
                (scope, request_id),
            )
            row = await cursor.fetchone()
            if row is None:
                return True
            if not row[0]:
                return False
            cursor = await conn.execute(
                "UPDATE idempotency_keys SET lease_until = now() + %s WHERE scope = %s"
                " AND request_id = %s AND state = 'pending' AND lease_until < now() RETURNING 1",
                (dt.timedelta(seconds=lease_s), scope, request_id),
            )
            return await cursor.fetchone() is not None

    async def release_request(self, scope: str, request_id: uuid.UUID) -> None:
        """See :meth:`PaymentsStore.release_request`."""
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE idempotency_keys SET lease_until = now()"
                " WHERE scope = %s AND request_id = %s AND state = 'pending'",
                (scope, request_id),
            )

    async def delete_expired_requests(self, older_than: dt.datetime) -> int:
        """Forget idempotency keys created before ``older_than``; return how many."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM idempotency_keys WHERE create_time < %s", (older_than,)
            )
            return cursor.rowcount

    @staticmethod
    async def _done(conn: AsyncConnection[Any], done: IdemDone | None) -> None:
        if done is not None:
            await conn.execute(_idem_sql_done(), (done.response, done.scope, done.request_id))

    # -- the Space projection ----------------------------------------------------------

    async def get_space(self, space_id: str) -> SpaceFacts | None:
        """What the projection knows of a Space."""
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT id, host_id, state, scheduled_start_time FROM spaces WHERE id = %s",
                (space_id,),
            )
            row = await cursor.fetchone()
        return _space(row) if row is not None else None

    async def event_processed(self, event_id: uuid.UUID) -> bool:
        """Whether a rooms event was fully applied already."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT 1 FROM processed_events WHERE event_id = %s", (event_id,)
            )
            return await cursor.fetchone() is not None

    async def mark_processed(self, event_id: uuid.UUID, event_type: str) -> None:
        """Record that a rooms event's effects are all done."""
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO processed_events (event_id, event_type) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                (event_id, event_type),
            )

    async def forget_processed_events(self, older_than: dt.datetime) -> int:
        """Drop dedupe records older than any redelivery (applying again is harmless too)."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM processed_events WHERE process_time < %s", (older_than,)
            )
            return cursor.rowcount

    async def project_space(
        self,
        space_id: str,
        host_id: str,
        state: SpaceState,
        scheduled_start_time: dt.datetime | None,
        *,
        reschedule: bool = False,
    ) -> SpaceState:
        """Apply a Space's new facts; states only move forward (events may arrive late).

        Going live (or ending) closes ticket sales; a cancellation cancels the offering
        (the refunds follow, driven by the caller and the worker). Neither happens when
        the event came too late to change the state.

        :return: the Space's state after the event.
        """
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT state FROM spaces WHERE id = %s FOR UPDATE", (space_id,)
            )
            row = await cursor.fetchone()
            current = SpaceState(row[0]) if row is not None else None
            if current is None:
                await conn.execute(
                    "INSERT INTO spaces (id, host_id, state, scheduled_start_time)"
                    " VALUES (%s, %s, %s, %s)",
                    (space_id, host_id, state.value, scheduled_start_time),
                )
                current = state
            elif reschedule:
                if current is SpaceState.SCHEDULED:
                    await conn.execute(
                        "UPDATE spaces SET scheduled_start_time = %s, update_time = now()"
                        " WHERE id = %s",
                        (scheduled_start_time, space_id),
                    )
            elif advances(current, state):
                await conn.execute(
                    "UPDATE spaces SET state = %s, update_time = now(),"
                    " scheduled_start_time = coalesce(%s, scheduled_start_time) WHERE id = %s",
                    (state.value, scheduled_start_time, space_id),
                )
                current = state
            elif current is SpaceState.SCHEDULED and scheduled_start_time is not None:
                await conn.execute(
                    "UPDATE spaces SET scheduled_start_time = coalesce(scheduled_start_time, %s)"
                    " WHERE id = %s",
                    (scheduled_start_time, space_id),
                )
            if current is not state:
                return current
            if state is SpaceState.LIVE or state is SpaceState.ENDED:
                await conn.execute(
                    "UPDATE ticket_offerings SET state = 'sales_closed', update_time = now()"
                    " WHERE space_id = %s AND state = 'on_sale'",
                    (space_id,),
                )
            elif state is SpaceState.CANCELED:
                await conn.execute(
                    "UPDATE ticket_offerings SET state = 'canceled', update_time = now()"
                    " WHERE space_id = %s AND state IN ('on_sale', 'sales_closed')",
                    (space_id,),
                )
            return current

    # -- offerings ---------------------------------------------------------------------

    async def get_offering(self, space_id: str) -> Offering | None:
        """The Space's ticket offering, if it has one."""
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_OFFERING_COLUMNS} FROM ticket_offerings WHERE space_id = %s",
                (space_id,),
            )
            row = await cursor.fetchone()
        return _offering(row) if row is not None else None

    async def get_offering_and_space(
        self, space_id: str
    ) -> tuple[Offering | None, SpaceFacts | None]:
        """The offering and the Space's facts in one round trip (the purchase hot path)."""
        columns = ", ".join(f"o.{c.strip()}" for c in _OFFERING_COLUMNS.split(","))
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {columns}, s.id AS s_id, s.host_id AS s_host_id, s.state AS s_state,"
                " s.scheduled_start_time AS s_start FROM (SELECT %s::text AS id) wanted"
                " LEFT JOIN ticket_offerings o ON o.space_id = wanted.id"
                " LEFT JOIN spaces s ON s.id = wanted.id",
                (space_id,),
            )
            row = await cursor.fetchone()
        assert row is not None
        space = (
            SpaceFacts(row["s_id"], row["s_host_id"], SpaceState(row["s_state"]), row["s_start"])
            if row["s_id"] is not None
            else None
        )
        if row["space_id"] is None:
            return None, space
        fields = {k: v for k, v in row.items() if not k.startswith("s_")}
        return _offering(fields), space

    async def create_offering(self, offering: Offering, done: IdemDone | None) -> bool:
        """Insert an offering; ``False`` when the Space has one already."""
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "INSERT INTO ticket_offerings (space_id, host_id, price_minor, currency_code,"
                " capacity, sales_end_time, state, create_time, update_time)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                (
                    offering.space_id,
                    offering.host_id,
                    offering.price_minor,
                    offering.currency_code,
                    offering.capacity,
                    offering.sales_end_time,
                    offering.state.value,
                    offering.create_time,
                    offering.update_time,
                ),
            )
            if await cursor.fetchone() is None:
                return False
            await self._done(conn, done)
            return True

    async def update_offering(
        self,
        space_id: str,
        check: Callable[[Offering], Offering],
    ) -> Offering | None:
        """Change an offering under its row lock: ``check`` refuses or returns the new one."""
        async with self._connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_OFFERING_COLUMNS} FROM ticket_offerings WHERE space_id = %s FOR UPDATE",
                (space_id,),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            new = check(_offering(row))
            await conn.execute(
                "UPDATE ticket_offerings SET price_minor = %s, currency_code = %s,"
                " capacity = %s, sales_end_time = %s, update_time = %s WHERE space_id = %s",
                (
                    new.price_minor,
                    new.currency_code,
                    new.capacity,
                    new.sales_end_time,
                    new.update_time,
                    space_id,
                ),
            )
            return new

    # -- tickets -----------------------------------------------------------------------

    async def reserve_seat(
        self, ticket: TicketRecord, price_minor: int, currency_code: str
    ) -> tuple[ReserveOutcome, TicketRecord | None]:
        """See :meth:`PaymentsStore.reserve_seat`.

        The conditional UPDATE is the whole overselling guard: it takes the offering's row
        lock and re-checks ``sold + reserved < capacity`` on the latest row version, so
        concurrent buyers queue on it and the last seat goes to exactly one of them. (The
        CHECK constraint ``never_oversold`` backs it up.)
        """
        try:
            async with self._connection() as conn, conn.transaction():
                cursor = await conn.execute(
                    "UPDATE ticket_offerings SET reserved_count = reserved_count + 1"
                    " WHERE space_id = %s AND state = 'on_sale' AND price_minor = %s"
                    " AND currency_code = %s AND sold_count + reserved_count < capacity"
                    " RETURNING 1",
                    (ticket.space_id, price_minor, currency_code),
                )
                if await cursor.fetchone() is None:
                    return await self._why_not_reserved(
                        conn, ticket.space_id, price_minor, currency_code
                    ), None
                await conn.execute(
                    f"INSERT INTO tickets ({_TICKET_COLUMNS}) VALUES"
                    " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    dataclasses.astuple(ticket),
                )
        except psycopg.errors.UniqueViolation as error:
            constraint = error.diag.constraint_name or ""
            if constraint == "tickets_one_per_user":
                return ReserveOutcome.ALREADY_OWNED, None
            # The same request reserved concurrently (a repeat racing the first attempt).
            existing = await self.find_ticket_by_request(ticket.request_scope, ticket.request_id)
            if existing is None:
                raise
            return ReserveOutcome.RESERVED, existing
        return ReserveOutcome.RESERVED, ticket

    @staticmethod
    async def _why_not_reserved(
        conn: AsyncConnection[Any], space_id: str, price_minor: int, currency_code: str
    ) -> ReserveOutcome:
        cursor = await conn.execute(
            "SELECT state, price_minor, currency_code, sold_count + reserved_count >= capacity"
            " FROM ticket_offerings WHERE space_id = %s",
            (space_id,),
        )
        row = await cursor.fetchone()
        if row is None:
            return ReserveOutcome.MISSING
        state, price, currency, full = row
        if state != OfferingState.ON_SALE.value:
            return ReserveOutcome.CLOSED
        if price != price_minor or currency != currency_code:
            return ReserveOutcome.PRICE_CHANGED
        if full:
            return ReserveOutcome.SOLD_OUT
        return ReserveOutcome.SOLD_OUT  # pragma: no cover - the UPDATE would have matched

    async def find_ticket_by_request(
        self, scope: str, request_id: uuid.UUID
    ) -> TicketRecord | None:
        """The ticket a purchase request made (reserved or further), if any."""
        return await self._one_ticket("request_scope = %s AND request_id = %s", (scope, request_id))

    async def get_ticket(self, space_id: str, ticket_id: str) -> TicketRecord | None:
        """A ticket that exists for its owner (reserved seats are not tickets yet)."""
        ticket = await self._one_ticket("id = %s AND space_id = %s", (ticket_id, space_id))
        return ticket if ticket is not None and ticket.state != "reserved" else None

    async def valid_ticket(self, space_id: str, user_id: str) -> TicketRecord | None:
        """The user's paid ticket for the Space, if any."""
        return await self._one_ticket(
            "space_id = %s AND owner_id = %s AND state = 'paid'", (space_id, user_id)
        )

    async def _one_ticket(self, where: str, params: Sequence[Any]) -> TicketRecord | None:
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE {where}", params)
            row = await cursor.fetchone()
        return TicketRecord(**row) if row is not None else None

    async def list_tickets(
        self,
        *,
        space_id: str | None,
        owner_id: str | None,
        state: str | None,
        before: str | None,
        limit: int,
    ) -> list[TicketRecord]:
        """Tickets newest first (by id), filtered; reserved seats are never listed."""
        clauses = ["state <> 'reserved'"]
        params: list[Any] = []
        if space_id is not None:
            clauses.append("space_id = %s")
            params.append(space_id)
        if owner_id is not None:
            clauses.append("owner_id = %s")
            params.append(owner_id)
        if state is not None:
            clauses.append("state = %s")
            params.append(state)
        if before is not None:
            clauses.append("id < %s")
            params.append(before)
        params.append(limit)
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE {' AND '.join(clauses)}"
                " ORDER BY id DESC LIMIT %s",
                params,
            )
            rows = await cursor.fetchall()
        return [TicketRecord(**row) for row in rows]

    async def release_seat(self, ticket_id: str) -> None:
        """Give back a reserved seat whose charge did not happen."""
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "DELETE FROM tickets WHERE id = %s AND state = 'reserved' RETURNING space_id",
                (ticket_id,),
            )
            row = await cursor.fetchone()
            if row is not None:
                await conn.execute(
                    "UPDATE ticket_offerings SET reserved_count = reserved_count - 1"
                    " WHERE space_id = %s",
                    (row[0],),
                )

    async def confirm_ticket(
        self,
        space_id: str,
        ticket_id: str,
        charge_id: str,
        entry: JournalEntry,
        make_event: Callable[[int], Event],
        done: IdemDone | None,
        late_settlement: JournalEntry | None,
    ) -> tuple[TicketRecord, OfferingState]:
        """Turn a reserved seat into a paid ticket with its sale entry and event.

        :param late_settlement: booked too when the Space was settled while the charge was
            in flight, so the revenue does not stay held forever.
        :return: the ticket and the offering's state (CANCELED means: refund it now).
        """
        async with self._connection() as conn, conn.transaction():
            # Offering row first, then the ticket: the order reserve_seat takes them in, so
            # the two cannot deadlock.
            await self._lock_offering(conn, space_id)
            cursor = await conn.execute(
                "UPDATE tickets SET state = 'paid', charge_id = %s"
                " WHERE id = %s AND state = 'reserved' RETURNING space_id",
                (charge_id, ticket_id),
            )
            row = await cursor.fetchone()
            if row is not None:
                cursor = await conn.execute(
                    "UPDATE ticket_offerings SET reserved_count = reserved_count - 1,"
                    " sold_count = sold_count + 1 WHERE space_id = %s"
                    " RETURNING sold_count, state",
                    (row[0],),
                )
                offering_row = await cursor.fetchone()
                assert offering_row is not None
                sold_count, state = offering_row
                await self._book(conn, entry)
                if state == OfferingState.SETTLED.value and late_settlement is not None:
                    await self._book(conn, late_settlement)
                    await conn.execute(
                        "UPDATE tickets SET settled = true WHERE id = %s", (ticket_id,)
                    )
                event = make_event(sold_count)
                await outbox.append(conn, event.event_type, event.key, event.payload)
                await self._done(conn, done)
            else:
                cursor = await conn.execute(
                    "SELECT o.state FROM tickets t JOIN ticket_offerings o"
                    " ON o.space_id = t.space_id WHERE t.id = %s",
                    (ticket_id,),
                )
                state_row = await cursor.fetchone()
                if state_row is None:
                    # The seat was released as "never charged" while this charge succeeded:
                    # the reservation protocol (leases) rules it out, so it is a bug.
                    raise Internal(f"ticket {ticket_id} vanished while its charge {charge_id} ran")
                state = state_row[0]
        ticket = await self._one_ticket("id = %s", (ticket_id,))
        assert ticket is not None
        return ticket, OfferingState(state)

    async def stale_reservations(self, older_than: dt.datetime, limit: int) -> list[TicketRecord]:
        """Reserved seats whose purchase stopped before an outcome (crash, lost answer)."""
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE state = 'reserved'"
                " AND create_time < %s ORDER BY create_time LIMIT %s",
                (older_than, limit),
            )
            rows = await cursor.fetchall()
        return [TicketRecord(**row) for row in rows]

    # -- refunds -----------------------------------------------------------------------

    async def begin_refund(
        self,
        space_id: str,
        ticket_id: str,
        reason: str,
        note: str,
        make_entry: Callable[[TicketRecord], JournalEntry],
    ) -> tuple[TicketRecord, bool]:
        """Invalidate a paid ticket and book its refund entry, in one transaction.

        The entry is booked when the refund starts: from then on the money is owed back
        to the buyer, whatever the processor says, and the worker retries the processor
        until it confirms. After settlement the refund comes out of the host's available
        balance, which must cover it (checked under the host's lock).

        :return: the ticket and whether this call started its refund.
        :raises InsufficientBalance: settled, and the host's available balance is short.
        """
        async with self._connection() as conn, conn.transaction():
            await self._lock_offering(conn, space_id)  # same lock order as reserve_seat
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE id = %s FOR UPDATE", (ticket_id,)
            )
            row = await cursor.fetchone()
            assert row is not None
            ticket = TicketRecord(**row)
            if ticket.state != "paid":
                return ticket, False
            if ticket.settled:
                net = ticket.price_minor - ticket.fee_minor
                await self._lock_user(conn, ticket.host_id)
                available = await self._account_balance(
                    conn, account(ticket.host_id, UserAccount.AVAILABLE), ticket.currency_code
                )
                if available < net:
                    raise InsufficientBalance(
                        "the host's available balance does not cover the refund"
                    )
            await conn.execute(
                "UPDATE tickets SET state = 'refund_pending', refund_reason = %s,"
                " refund_note = %s WHERE id = %s",
                (reason, note, ticket_id),
            )
            await conn.execute(
                "UPDATE ticket_offerings SET sold_count = sold_count - 1, update_time = now()"
                " WHERE space_id = %s",
                (ticket.space_id,),
            )
            await self._book(conn, make_entry(ticket))
        started = dataclasses.replace(
            ticket, state="refund_pending", refund_reason=reason, refund_note=note
        )
        return started, True

    async def complete_refund(
        self, ticket_id: str, now: dt.datetime, make_event: Callable[[TicketRecord], Event]
    ) -> tuple[TicketRecord, bool]:
        """Mark a refund confirmed by the processor; return the ticket and whether this did."""
        async with self._connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "UPDATE tickets SET state = 'refunded', refund_time = %s"
                f" WHERE id = %s AND state = 'refund_pending' RETURNING {_TICKET_COLUMNS}",
                (now, ticket_id),
            )
            row = await cursor.fetchone()
            if row is None:
                ticket = await self._one_ticket("id = %s", (ticket_id,))
                assert ticket is not None
                return ticket, False
            ticket = TicketRecord(**row)
            event = make_event(ticket)
            await outbox.append(conn, event.event_type, event.key, event.payload)
            return ticket, True

    async def tickets_to_refund(self, space_id: str, limit: int) -> list[TicketRecord]:
        """Valid or refund-pending tickets of a Space, oldest first."""
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE space_id = %s"
                " AND state IN ('paid', 'refund_pending') ORDER BY id LIMIT %s",
                (space_id, limit),
            )
            rows = await cursor.fetchall()
        return [TicketRecord(**row) for row in rows]

    async def count_unrefunded(self, space_id: str) -> int:
        """Tickets of a Space still to refund (reserved seats included: they may be paid)."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT count(*) FROM tickets WHERE space_id = %s"
                " AND state IN ('reserved', 'paid', 'refund_pending')",
                (space_id,),
            )
            row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0

    async def pending_refunds(self, limit: int) -> list[TicketRecord]:
        """Refunds started and not confirmed (a crash or a processor outage in between)."""
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE state = 'refund_pending'"
                " ORDER BY id LIMIT %s",
                (limit,),
            )
            rows = await cursor.fetchall()
        return [TicketRecord(**row) for row in rows]

    async def canceled_with_tickets(self, limit: int) -> list[str]:
        """Canceled offerings that still have valid tickets."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT o.space_id FROM ticket_offerings o WHERE o.state = 'canceled'"
                " AND EXISTS (SELECT 1 FROM tickets t WHERE t.space_id = o.space_id"
                " AND t.state = 'paid') LIMIT %s",
                (limit,),
            )
            return [row[0] for row in await cursor.fetchall()]

    async def cancel_offering(self, space_id: str) -> OfferingState | None:
        """Stop sales of a canceled Space; return the offering's state after (or ``None``)."""
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE ticket_offerings SET state = 'canceled', update_time = now()"
                " WHERE space_id = %s AND state IN ('on_sale', 'sales_closed')",
                (space_id,),
            )
            cursor = await conn.execute(
                "SELECT state FROM ticket_offerings WHERE space_id = %s", (space_id,)
            )
            row = await cursor.fetchone()
        return OfferingState(row[0]) if row is not None else None

    # -- settlement --------------------------------------------------------------------

    async def get_settlement(self, space_id: str) -> Settlement | None:
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT amounts, settle_time FROM settlements WHERE space_id = %s", (space_id,)
            )
            row = await cursor.fetchone()
        if row is None:
            return None
        return Settlement(space_id, {k: int(v) for k, v in row[0].items()}, row[1])

    async def settle(
        self,
        space_id: str,
        now: dt.datetime,
        make_entry: Callable[[str, str, int], JournalEntry],
    ) -> Settlement:
        """Release a Space's held revenue (tickets and tips) to its payees' available.

        Locks the projection row so tips booked concurrently either land before (and are
        settled here) or see the settlement (and settle themselves).

        :raises FailedPrecondition: ``TICKET_OFFERING_CANCELED``.
        """
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM spaces WHERE id = %s FOR UPDATE", (space_id,))
            cursor = await conn.execute(
                "SELECT amounts, settle_time FROM settlements WHERE space_id = %s", (space_id,)
            )
            row = await cursor.fetchone()
            if row is not None:
                return Settlement(space_id, {k: int(v) for k, v in row[0].items()}, row[1])
            cursor = await conn.execute(
                "SELECT state FROM ticket_offerings WHERE space_id = %s FOR UPDATE", (space_id,)
            )
            offering = await cursor.fetchone()
            if offering is not None and offering[0] == OfferingState.CANCELED.value:
                raise FailedPrecondition(
                    "the Space's tickets were refunded for a cancellation",
                    reason="TICKET_OFFERING_CANCELED",
                )
            cursor = await conn.execute(
                "SELECT payee, currency_code, sum(net)::bigint FROM ("
                " SELECT host_id AS payee, currency_code, price_minor - fee_minor AS net"
                " FROM tickets WHERE space_id = %s AND state = 'paid' AND NOT settled"
                " UNION ALL"
                " SELECT recipient_id, currency_code, amount_minor - fee_minor"
                " FROM tips WHERE space_id = %s AND state = 'paid' AND NOT settled) revenue"
                " GROUP BY payee, currency_code ORDER BY payee, currency_code",
                (space_id, space_id),
            )
            totals: dict[str, int] = {}
            for payee, currency, amount in await cursor.fetchall():
                if amount > 0:
                    await self._book(conn, make_entry(payee, currency, int(amount)))
                    totals[currency] = totals.get(currency, 0) + int(amount)
            await conn.execute(
                "UPDATE tickets SET settled = true WHERE space_id = %s AND state = 'paid'",
                (space_id,),
            )
            await conn.execute(
                "UPDATE tips SET settled = true WHERE space_id = %s AND state = 'paid'",
                (space_id,),
            )
            await conn.execute(
                "UPDATE ticket_offerings SET state = 'settled', update_time = now()"
                " WHERE space_id = %s",
                (space_id,),
            )
            await conn.execute(
                "INSERT INTO settlements (space_id, amounts, settle_time) VALUES (%s, %s, %s)",
                (space_id, json.dumps(totals), now),
            )
        return Settlement(space_id, totals, now)

    # -- tips --------------------------------------------------------------------------

    async def find_tip_by_request(self, scope: str, request_id: uuid.UUID) -> TipRecord | None:
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_TIP_COLUMNS} FROM tips WHERE request_scope = %s AND request_id = %s",
                (scope, request_id),
            )
            row = await cursor.fetchone()
        return TipRecord(**row) if row is not None else None

    async def begin_tip(self, tip: TipRecord) -> TipRecord:
        """Record a tip about to be charged (or return the one this request recorded)."""
        async with self._connection() as conn:
            await conn.execute(
                f"INSERT INTO tips ({_TIP_COLUMNS}) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (request_scope, request_id) DO NOTHING",
                dataclasses.astuple(tip),
            )
        found = await self.find_tip_by_request(tip.request_scope, tip.request_id)
        assert found is not None
        return found

    async def drop_tip(self, tip_id: str) -> None:
        """Forget a pending tip whose charge did not happen."""
        async with self._connection() as conn:
            await conn.execute("DELETE FROM tips WHERE id = %s AND state = 'pending'", (tip_id,))

    async def stale_tips(self, older_than: dt.datetime, limit: int) -> list[TipRecord]:
        """Pending tips whose request stopped before an outcome."""
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_TIP_COLUMNS} FROM tips WHERE state = 'pending' AND create_time < %s"
                " ORDER BY create_time LIMIT %s",
                (older_than, limit),
            )
            rows = await cursor.fetchall()
        return [TipRecord(**row) for row in rows]

    async def book_tip(
        self,
        tip: TipRecord,
        charge_id: str,
        entry: JournalEntry,
        event: Event,
        done: IdemDone | None,
        late_settlement: JournalEntry,
    ) -> TipRecord:
        """Mark a pending tip paid with its entry and event (settled at once if the Space
        was settled meanwhile); a tip already paid is returned as it is."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM spaces WHERE id = %s FOR SHARE", (tip.space_id,))
            cursor = await conn.execute(
                "SELECT 1 FROM settlements WHERE space_id = %s", (tip.space_id,)
            )
            settled = await cursor.fetchone() is not None
            cursor = await conn.execute(
                "UPDATE tips SET state = 'paid', charge_id = %s, settled = %s"
                " WHERE id = %s AND state = 'pending' RETURNING 1",
                (charge_id, settled, tip.id),
            )
            if await cursor.fetchone() is not None:
                await self._book(conn, entry)
                if settled:
                    await self._book(conn, late_settlement)
                await outbox.append(conn, event.event_type, event.key, event.payload)
                await self._done(conn, done)
        paid = await self.find_tip_by_request(tip.request_scope, tip.request_id)
        assert paid is not None
        return paid

    # -- payouts -----------------------------------------------------------------------

    async def request_payout(
        self, payout: PayoutRecord, entry: JournalEntry, done: IdemDone | None
    ) -> PayoutRecord:
        """Reserve a payout's amount out of available.

        :raises InsufficientBalance: available is lower than the amount.
        """
        async with self._connection() as conn, conn.transaction():
            await self._lock_user(conn, payout.user_id)
            available = await self._account_balance(
                conn, account(payout.user_id, UserAccount.AVAILABLE), payout.currency_code
            )
            if available < payout.amount_minor:
                raise InsufficientBalance(
                    f"the available balance in {payout.currency_code} is lower than the amount"
                )
            await conn.execute(
                f"INSERT INTO payouts ({_PAYOUT_COLUMNS}) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                dataclasses.astuple(payout),
            )
            await self._book(conn, entry)
            await self._done(conn, done)
        return payout

    async def find_payout_by_request(
        self, user_id: str, request_id: uuid.UUID
    ) -> PayoutRecord | None:
        return await self._one_payout("user_id = %s AND request_id = %s", (user_id, request_id))

    async def get_payout(self, user_id: str, payout_id: str) -> PayoutRecord | None:
        return await self._one_payout("user_id = %s AND id = %s", (user_id, payout_id))

    async def _one_payout(self, where: str, params: Sequence[Any]) -> PayoutRecord | None:
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(f"SELECT {_PAYOUT_COLUMNS} FROM payouts WHERE {where}", params)
            row = await cursor.fetchone()
        return PayoutRecord(**row) if row is not None else None

    async def list_payouts(
        self, user_id: str, before: str | None, limit: int
    ) -> list[PayoutRecord]:
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_PAYOUT_COLUMNS} FROM payouts WHERE user_id = %s"
                " AND (%s::text IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
                (user_id, before, before, limit),
            )
            rows = await cursor.fetchall()
        return [PayoutRecord(**row) for row in rows]

    async def pending_payouts(self, limit: int) -> list[PayoutRecord]:
        async with self._connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {_PAYOUT_COLUMNS} FROM payouts WHERE state = 'pending'"
                " ORDER BY create_time LIMIT %s",
                (limit,),
            )
            rows = await cursor.fetchall()
        return [PayoutRecord(**row) for row in rows]

    async def complete_payout(
        self,
        payout_id: str,
        paid: bool,
        failure_reason: str,
        now: dt.datetime,
        entry: JournalEntry,
        make_event: Callable[[PayoutRecord], Event],
    ) -> PayoutRecord | None:
        """Record the processor's outcome of a pending payout; ``None`` if already done."""
        async with self._connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "UPDATE payouts SET state = %s, failure_reason = %s, complete_time = %s"
                f" WHERE id = %s AND state = 'pending' RETURNING {_PAYOUT_COLUMNS}",
                ("paid" if paid else "failed", failure_reason, now, payout_id),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            payout = PayoutRecord(**row)
            await self._book(conn, entry)
            event = make_event(payout)
            await outbox.append(conn, event.event_type, event.key, event.payload)
        return payout

    # -- ledger ------------------------------------------------------------------------

    async def balances(self, user_id: str) -> dict[str, dict[str, int]]:
        """A user's account balances: currency -> account suffix -> amount."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT account, currency_code, sum(amount_minor)::bigint FROM postings"
                " WHERE user_id = %s GROUP BY account, currency_code",
                (user_id,),
            )
            rows = await cursor.fetchall()
        result: dict[str, dict[str, int]] = {}
        for name, currency, amount in rows:
            result.setdefault(currency, {})[name.rsplit("/", 1)[1]] = int(amount)
        return result

    async def ledger_entries(
        self, user_id: str, before: str | None, limit: int
    ) -> list[EntryRecord]:
        """Entries touching a user's accounts, newest first (ids are time-ordered)."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT e.id, e.kind, e.subject, e.description, e.create_time FROM"
                " journal_entries e WHERE e.id IN (SELECT DISTINCT entry_id FROM postings"
                " WHERE user_id = %s AND (%s::text IS NULL OR entry_id < %s))"
                " ORDER BY e.id DESC LIMIT %s",
                (user_id, before, before, limit),
            )
            heads = await cursor.fetchall()
            ids = [row[0] for row in heads]
            cursor = await conn.execute(
                "SELECT entry_id, account, amount_minor, currency_code, user_id FROM postings"
                " WHERE entry_id = ANY(%s) ORDER BY id",
                (ids,),
            )
            lines: dict[str, list[Posting]] = {}
            for entry_id, name, amount, currency, owner in await cursor.fetchall():
                lines.setdefault(entry_id, []).append(Posting(name, amount, currency, owner))
        return [
            EntryRecord(row[0], row[1], row[2], row[3], row[4], tuple(lines.get(row[0], [])))
            for row in heads
        ]

    async def check_books(self) -> BooksReport:
        """Run the ledger invariant check (see :mod:`services.payments.ledger`)."""
        async with self._pool.connection() as conn:
            return await ledger.check_books(conn)

    @staticmethod
    async def _book(conn: AsyncConnection[Any], entry: JournalEntry) -> str:
        entry_id = new_id()
        await conn.execute(
            "INSERT INTO journal_entries (id, kind, subject, description, dedupe_key)"
            " VALUES (%s, %s, %s, %s, %s)",
            (entry_id, entry.kind.value, entry.subject, entry.description, entry.dedupe_key),
        )
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO postings (entry_id, account, user_id, amount_minor, currency_code)"
                " VALUES (%s, %s, %s, %s, %s)",
                [
                    (entry_id, p.account, p.user_id, p.amount_minor, p.currency_code)
                    for p in entry.postings
                ],
            )
        return entry_id

    @staticmethod
    async def _lock_offering(conn: AsyncConnection[Any], space_id: str) -> None:
        await conn.execute(
            "SELECT 1 FROM ticket_offerings WHERE space_id = %s FOR UPDATE", (space_id,)
        )

    @staticmethod
    async def _lock_user(conn: AsyncConnection[Any], user_id: str) -> None:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"payments.user.{user_id}",),
        )

    @staticmethod
    async def _account_balance(conn: AsyncConnection[Any], name: str, currency: str) -> int:
        cursor = await conn.execute(
            "SELECT coalesce(sum(amount_minor), 0)::bigint FROM postings"
            " WHERE account = %s AND currency_code = %s",
            (name, currency),
        )
        row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0
