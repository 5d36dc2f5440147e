"""Versioned migrations against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
from psycopg import AsyncConnection

from services.common.db import create_pool
from services.common.migrations import (
    COMMON_MIGRATIONS,
    MigrationError,
    apply_migrations,
    load_migrations,
    migrate,
)


@pytest.fixture
def migrations_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations"
    directory.mkdir()
    (directory / "0001_things.sql").write_text(
        "CREATE TABLE things (id text PRIMARY KEY, size int NOT NULL);\n"
        "CREATE INDEX things_size ON things (size);\n"
    )
    (directory / "0002_thing_names.sql").write_text("ALTER TABLE things ADD COLUMN name text;\n")
    return directory


def ledger(database_url: str, schema: str) -> list[tuple[str, int, str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT component, version, name FROM {schema}.schema_migrations"
            " ORDER BY component, version"
        ).fetchall()
    return [(c, v, n) for c, v, n in rows]


async def test_applies_in_order_once(database_url: str, migrations_dir: Path) -> None:
    applied = await migrate(database_url, "things", migrations_dir)
    assert [m.name for m in applied] == ["outbox", "things", "thing_names"]
    assert await migrate(database_url, "things", migrations_dir) == []
    assert ledger(database_url, "things") == [
        ("common", 1, "outbox"),
        ("service", 1, "things"),
        ("service", 2, "thing_names"),
    ]
    # A later file is picked up on the next start.
    (migrations_dir / "0003_more.sql").write_text("ALTER TABLE things ADD COLUMN more int;")
    assert [m.version for m in await migrate(database_url, "things", migrations_dir)] == [3]


async def test_four_replicas_starting_at_once(database_url: str, migrations_dir: Path) -> None:
    results = await asyncio.gather(
        *(migrate(database_url, "things", migrations_dir) for _ in range(4))
    )
    assert sorted(len(r) for r in results) == [0, 0, 0, 3]
    assert len(ledger(database_url, "things")) == 3


async def test_schemas_are_independent(database_url: str, migrations_dir: Path) -> None:
    await asyncio.gather(
        migrate(database_url, "rooms", migrations_dir),
        migrate(database_url, "notify", None),
    )
    assert len(ledger(database_url, "rooms")) == 3
    assert ledger(database_url, "notify") == [("common", 1, "outbox")]


async def test_changed_migration_is_refused(database_url: str, migrations_dir: Path) -> None:
    await migrate(database_url, "things", migrations_dir)
    (migrations_dir / "0001_things.sql").write_text("CREATE TABLE things (id text);")
    with pytest.raises(MigrationError, match="was changed"):
        await migrate(database_url, "things", migrations_dir)


async def test_failed_migration_leaves_nothing(database_url: str, migrations_dir: Path) -> None:
    (migrations_dir / "0003_broken.sql").write_text("ALTER TABLE nope ADD COLUMN x int;")
    with pytest.raises(psycopg.errors.UndefinedTable):
        await migrate(database_url, "things", migrations_dir)
    with psycopg.connect(database_url) as conn:
        schema = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'things'").fetchone()
    assert schema is None


def test_file_names_are_checked(tmp_path: Path) -> None:
    (tmp_path / "1_bad.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError):
        load_migrations(tmp_path)
    (tmp_path / "1_bad.sql").unlink()
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="share a version"):
        load_migrations(tmp_path)


def test_common_migrations_ship_the_outbox() -> None:
    assert [m.name for m in COMMON_MIGRATIONS] == ["outbox"]


async def test_pool_uses_the_service_schema(database_url: str, migrations_dir: Path) -> None:
    async with await AsyncConnection.connect(database_url) as conn:
        await apply_migrations(conn, "things", load_migrations(migrations_dir))
    pool = await create_pool(database_url, "things", min_size=1, max_size=2, timeout_s=5)
    try:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO things (id, size) VALUES ('a', 1)")
        async with pool.connection() as conn:
            cursor = await conn.execute("SELECT current_schema(), count(*) FROM things")
            assert await cursor.fetchone() == ("things", 1)
    finally:
        await pool.close()


def test_schema_names_are_checked() -> None:
    from services.common.db import schema_identifier

    with pytest.raises(ValueError):
        schema_identifier('rooms"; DROP SCHEMA x; --')
