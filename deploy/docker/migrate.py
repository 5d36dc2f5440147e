"""Apply every service's schema migrations, then exit: the chart's pre-upgrade Job.

Run in the image as ``python deploy/docker/migrate.py`` with ``SPACES_DATABASE_URL`` set.
Each service also migrates at start-up; running this first means new pods find nothing to
do, and a failing migration stops the upgrade before any old pod is replaced.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from pathlib import Path

from services.common.logs import configure_logging
from services.common.migrations import migrate
from services.common.settings import CommonSettings

logger = logging.getLogger("spaces.migrations")

#: Services that own a PostgreSQL schema; their ``main`` modules name it and its files.
SERVICES_WITH_SCHEMA: tuple[str, ...] = ("identity", "rooms", "notify", "payments")


def schema_of(service: str) -> tuple[str, Path]:
    """Return ``(schema, migrations directory)`` as the service's ``main`` module names them."""
    module = importlib.import_module(f"services.{service}.main")
    return str(module.SCHEMA), Path(module.MIGRATIONS)


async def migrate_all(url: str) -> int:
    """Apply pending migrations of every schema; return how many were applied."""
    total = 0
    for service in SERVICES_WITH_SCHEMA:
        schema, directory = schema_of(service)
        applied = await migrate(url, schema, directory)
        logger.info("schema %s: %d migrations applied", schema, len(applied))
        total += len(applied)
    return total


def main() -> int:
    common = CommonSettings()
    configure_logging("migrations", common)
    if not common.database_url:
        logger.error("SPACES_DATABASE_URL is not set")
        return 2
    asyncio.run(migrate_all(common.database_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
