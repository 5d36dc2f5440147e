"""PostgreSQL connection pools (psycopg 3, async).

Each service owns one schema in a shared database; its pool points ``search_path`` at that
schema, so SQL in the service (and its migrations) uses unqualified table names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from services.common import context

logger = logging.getLogger(__name__)

__all__ = ["Pool", "create_pool", "schema_identifier"]


class Pool(AsyncConnectionPool[AsyncConnection[TupleRow]]):
    """A pool whose wait for a connection never outlives the current RPC's deadline.

    While the database is down no connection comes; without a bound, a call would wait
    the pool's whole timeout and its caller would see DEADLINE_EXCEEDED. Bounded, the
    wait ends in time for the service to answer UNAVAILABLE (``psycopg_pool.PoolTimeout``,
    mapped by the error interceptor), which clients retry.
    """

    @asynccontextmanager
    async def connection(
        self, timeout: float | None = None
    ) -> AsyncIterator[AsyncConnection[TupleRow]]:
        if timeout is None:
            left = context.time_left_for_wait()
            if left is not None:
                timeout = min(self.timeout, left)
        async with super().connection(timeout=timeout) as conn:
            yield conn


_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def schema_identifier(schema: str) -> sql.Identifier:
    """Return ``schema`` as a quoted SQL identifier, refusing anything but a plain name."""
    if not _SCHEMA.match(schema):
        raise ValueError(f"invalid schema name: {schema!r}")
    return sql.Identifier(schema)


async def create_pool(
    url: str,
    schema: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeout_s: float = 30.0,
) -> Pool:
    """Open a pool whose connections use ``schema``, waiting until it is usable.

    :param url: libpq URI or DSN.
    :param schema: the service's schema, first on the ``search_path``.
    :param min_size: connections kept open.
    :param max_size: most connections at once.
    :param timeout_s: how long to wait for the first ``min_size`` connections (and, later,
        for a free connection) before failing.
    :raises psycopg_pool.PoolTimeout: when the database is not reachable in time.
    """
    search_path = sql.SQL("SET search_path TO {}, public").format(schema_identifier(schema))

    async def configure(conn: AsyncConnection[TupleRow]) -> None:
        # A session setting rather than a connection option, so it also works through
        # poolers that refuse unknown startup parameters.
        await conn.execute(search_path)
        await conn.commit()

    pool = Pool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        configure=configure,
        # Check a connection before lending it, so a database restart costs a reconnect
        # rather than an error in the next request.
        check=AsyncConnectionPool.check_connection,
        open=False,
        name=f"spaces-{schema}",
    )
    await pool.open(wait=True, timeout=timeout_s)
    logger.info("database pool for schema %s ready (%d-%d connections)", schema, min_size, max_size)
    return pool
