"""Notify's migrations upgrade a schema that already holds notifications and webhooks."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg

from services.common.migrations import migrate
from services.notify.main import MIGRATIONS, SCHEMA


async def test_upgrade_from_the_first_migration_keeps_the_data(
    database_url: str, tmp_path: Path
) -> None:
    first = tmp_path / "migrations"
    first.mkdir()
    shutil.copy(MIGRATIONS / "0001_init.sql", first)
    await migrate(database_url, SCHEMA, first)
    with psycopg.connect(database_url) as conn:
        conn.execute("SET search_path TO notify")
        conn.execute(
            "INSERT INTO notifications (user_id, kind, title, dedupe_key) VALUES ('u', 8, 't', 'k')"
        )
        conn.execute("INSERT INTO webhooks (id, user_id, url, secret) VALUES ('w', 'u', 'x', 's')")

    await migrate(database_url, SCHEMA, MIGRATIONS)

    with psycopg.connect(database_url) as conn:
        conn.execute("SET search_path TO notify")
        assert conn.execute("SELECT user_id, dedupe_key FROM notifications").fetchall() == [
            ("u", "k")
        ]
        key = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'notifications'::regclass AND contype = 'p'"
        ).fetchall()
        assert key == [("PRIMARY KEY (id)",)]
        webhook = conn.execute(
            "SELECT state, consecutive_failures, disabled_time, disabled_reason FROM webhooks"
        ).fetchall()
        assert webhook == [(1, 0, None, "")]
