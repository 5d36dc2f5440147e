"""The invariant check that proves the books balance, without any RPC.

Tests, the bench and the background worker (through the ``ledger imbalance`` gauge) run
:func:`check_books` against the payments schema. The database already refuses an
unbalanced entry at commit (a deferred constraint trigger) and any change to a booked
entry; this check re-proves the whole ledger from the postings and ties it to the
tickets and offerings it must agree with.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from psycopg import AsyncConnection, sql

from services.common.db import schema_identifier

logger = logging.getLogger(__name__)

__all__ = ["BooksReport", "check_books", "check_books_at"]


@dataclasses.dataclass(frozen=True)
class BooksReport:
    """What :func:`check_books` found.

    :ivar entries: journal entries in the ledger.
    :ivar unbalanced_entries: entries whose postings do not sum to zero in some currency,
        or that have fewer than two postings.
    :ivar currency_totals: the sum of every posting per currency (each must be 0).
    :ivar ticket_mismatches: tickets (and tips) whose entries disagree with their state
        (a paid ticket without its sale, a refund booked twice or not at all...).
    :ivar offering_mismatches: offerings whose sold/reserved counts disagree with their
        tickets.
    :ivar processor_gap: per currency, money the sandbox processor holds for us minus what
        the clearing account says (non-zero only while refunds await the processor).
    """

    entries: int
    unbalanced_entries: int
    currency_totals: dict[str, int]
    ticket_mismatches: int
    offering_mismatches: int
    processor_gap: dict[str, int]

    @property
    def problems(self) -> int:
        """How many things are wrong (0 when the books balance)."""
        return (
            self.unbalanced_entries
            + sum(1 for total in self.currency_totals.values() if total != 0)
            + self.ticket_mismatches
            + self.offering_mismatches
        )

    @property
    def balanced(self) -> bool:
        """True when every entry and every currency sums to zero and tickets agree."""
        return self.problems == 0


async def _scalar(conn: AsyncConnection[Any], query: str) -> int:
    cursor = await conn.execute(query.encode())
    row = await cursor.fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


async def check_books(conn: AsyncConnection[Any]) -> BooksReport:
    """Check the ledger of the schema on ``conn``'s ``search_path`` (one snapshot).

    :param conn: a connection whose ``search_path`` is the payments schema.
    """
    async with conn.transaction():
        # One consistent snapshot, so concurrent bookings cannot make it report ghosts.
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        entries = await _scalar(conn, "SELECT count(*) FROM journal_entries")
        unbalanced = await _scalar(
            conn,
            "SELECT count(*) FROM (SELECT entry_id FROM postings GROUP BY entry_id,"
            " currency_code HAVING sum(amount_minor) <> 0) bad",
        )
        unbalanced += await _scalar(
            conn,
            "SELECT count(*) FROM journal_entries e WHERE (SELECT count(*) FROM postings p"
            " WHERE p.entry_id = e.id) < 2",
        )
        cursor = await conn.execute(
            "SELECT currency_code, sum(amount_minor)::bigint FROM postings GROUP BY 1"
        )
        totals = {row[0]: int(row[1]) for row in await cursor.fetchall()}
        ticket_mismatches = await _scalar(
            conn,
            "SELECT count(*) FROM tickets t"
            " LEFT JOIN journal_entries s ON s.dedupe_key = 'sale:' || t.id"
            " LEFT JOIN journal_entries r ON r.dedupe_key = 'refund:' || t.id"
            " WHERE (s.id IS NOT NULL) <> (t.state <> 'reserved')"
            " OR (r.id IS NOT NULL) <> (t.state IN ('refund_pending', 'refunded'))",
        )
        ticket_mismatches += await _scalar(
            conn,
            "SELECT count(*) FROM tips t"
            " LEFT JOIN journal_entries e ON e.dedupe_key = 'tip:' || t.id"
            " WHERE (e.id IS NOT NULL) <> (t.state = 'paid')",
        )
        offering_mismatches = await _scalar(
            conn,
            "SELECT count(*) FROM ticket_offerings o WHERE"
            " o.sold_count <> (SELECT count(*) FROM tickets t WHERE t.space_id = o.space_id"
            " AND t.state = 'paid')"
            " OR o.reserved_count <> (SELECT count(*) FROM tickets t"
            " WHERE t.space_id = o.space_id AND t.state = 'reserved')",
        )
        cursor = await conn.execute(
            "SELECT currency_code, sum(amount_minor - refunded_minor)::bigint"
            " FROM sandbox_charges WHERE status = 'captured' GROUP BY 1"
        )
        held_by_processor = {row[0]: int(row[1]) for row in await cursor.fetchall()}
        cursor = await conn.execute(
            "SELECT currency_code, sum(amount_minor)::bigint FROM postings"
            " WHERE account = 'processor/accounts/clearing' GROUP BY 1"
        )
        clearing = {row[0]: -int(row[1]) for row in await cursor.fetchall()}
    gap = {
        currency: held_by_processor.get(currency, 0) - clearing.get(currency, 0)
        for currency in set(held_by_processor) | set(clearing)
    }
    return BooksReport(
        entries=entries,
        unbalanced_entries=unbalanced,
        currency_totals=totals,
        ticket_mismatches=ticket_mismatches,
        offering_mismatches=offering_mismatches,
        processor_gap={k: v for k, v in gap.items() if v != 0},
    )


async def check_books_at(url: str, schema: str = "payments") -> BooksReport:
    """Connect to ``url`` and check the books of ``schema`` (bench, operators)."""
    async with await AsyncConnection.connect(url) as conn:
        await conn.execute(sql.SQL("SET search_path TO {}").format(schema_identifier(schema)))
        await conn.commit()
        return await check_books(conn)
