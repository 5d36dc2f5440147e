"""Versioned SQL migrations, applied at start-up.

A service keeps its migrations as files ``NNNN_name.sql`` in one directory (for example
``services/rooms/migrations/0001_spaces.sql``). :func:`apply_migrations` applies the ones not
yet recorded in ``<schema>.schema_migrations``, in version order, in one transaction, so a
failed migration leaves nothing behind. The runtime's own migrations (the outbox tables,
:data:`COMMON_MIGRATIONS`) are applied first to every schema and recorded under the
component ``common``; the service's under ``service``.

Several replicas may start at once: the transaction first takes an advisory lock keyed by
the schema, so one replica migrates while the others wait and then find nothing to do.
Files must not change once applied: a different checksum stops the start-up. Migration SQL
uses unqualified names (``search_path`` is the schema) and must be transactional (so no
``CREATE INDEX CONCURRENTLY``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

from services.common.db import schema_identifier

logger = logging.getLogger(__name__)

__all__ = [
    "COMMON_MIGRATIONS",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "load_migrations",
    "migrate",
]

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The migrations on disk and those recorded in the database disagree."""


@dataclass(frozen=True)
class Migration:
    """One migration file.

    :ivar version: the number in its name.
    :ivar name: the rest of its name, without ``.sql``.
    :ivar sql: its text.
    :ivar checksum: SHA-256 of its bytes (hex).
    """

    version: int
    name: str
    sql: str
    checksum: str

    @classmethod
    def from_file(cls, path: Path) -> Migration:
        """Read a ``NNNN_name.sql`` file."""
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file names look like 0001_name.sql: {path}")
        data = path.read_bytes()
        return cls(
            version=int(match.group(1)),
            name=match.group(2),
            sql=data.decode(),
            checksum=hashlib.sha256(data).hexdigest(),
        )


def load_migrations(directory: Path) -> list[Migration]:
    """Return the migrations in ``directory`` by version; other files are not allowed."""
    migrations = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix == ".sql":
            migrations.append(Migration.from_file(path))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version in {directory}")
    return sorted(migrations, key=lambda m: m.version)


COMMON_MIGRATIONS: list[Migration] = load_migrations(Path(__file__).parent / "sql")
"""Migrations of the runtime itself (the outbox), applied to every service schema."""

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


async def apply_migrations(
    conn: AsyncConnection[TupleRow],
    schema: str,
    migrations: list[Migration],
    *,
    include_common: bool = True,
) -> list[Migration]:
    """Bring ``schema`` up to date; return the migrations this call applied.

    :param conn: a connection not inside a transaction.
    :param schema: the service's schema (created when missing).
    :param migrations: the service's migrations (see :func:`load_migrations`).
    :param include_common: also apply :data:`COMMON_MIGRATIONS` (the outbox).
    :raises MigrationError: an applied migration's file changed.
    """
    ident = schema_identifier(schema)
    applied: list[Migration] = []
    async with conn.transaction():
        # Serialize concurrent starters; the lock is released at commit or rollback.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"spaces.migrations.{schema}",),
        )
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(ident))
        await conn.execute(_CREATE_LEDGER)
        components = [("common", COMMON_MIGRATIONS)] if include_common else []
        components.append(("service", migrations))
        for component, wanted in components:
            applied += await _apply_component(conn, schema, component, wanted)
    return applied


async def _apply_component(
    conn: AsyncConnection[TupleRow], schema: str, component: str, wanted: list[Migration]
) -> list[Migration]:
    cursor = await conn.execute(
        "SELECT version, name, checksum FROM schema_migrations WHERE component = %s",
        (component,),
    )
    recorded = {version: (name, checksum) for version, name, checksum in await cursor.fetchall()}
    applied = []
    for migration in wanted:
        if migration.version in recorded:
            name, checksum = recorded[migration.version]
            if checksum != migration.checksum:
                raise MigrationError(
                    f"{schema}: applied migration {migration.version:04d}_{name} was changed; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        logger.info(
            "%s: applying %s migration %04d_%s",
            schema,
            component,
            migration.version,
            migration.name,
        )
        # Sent without parameters, so psycopg uses the simple protocol and a file may hold
        # several statements.
        await conn.execute(migration.sql.encode())
        await conn.execute(
            "INSERT INTO schema_migrations (component, version, name, checksum)"
            " VALUES (%s, %s, %s, %s)",
            (component, migration.version, migration.name, migration.checksum),
        )
        applied.append(migration)
    unknown = set(recorded) - {m.version for m in wanted}
    if unknown:
        # A newer release applied these; an older replica still running during a rolling
        # update must keep working, so this is not an error.
        logger.info("%s: %s migrations %s are newer than this code", schema, component, unknown)
    return applied


async def migrate(url: str, schema: str, directory: Path | None) -> list[Migration]:
    """Connect to ``url`` and apply the common migrations plus those in ``directory``.

    :param url: libpq URI or DSN.
    :param schema: the service's schema.
    :param directory: the service's migration files; ``None`` for the common ones only.
    """
    migrations = load_migrations(directory) if directory is not None else []
    async with await AsyncConnection.connect(url) as conn:
        return await apply_migrations(conn, schema, migrations)
