"""A host with a million followers goes live: notify's fan-out rate, and a reminder's lateness.

1. Fresh embedded PostgreSQL and Valkey (or ``SPACES_DATABASE_URL`` / ``SPACES_REDIS_URL``),
   identity's migrations, and ``BENCH_FOLLOWERS`` (default 1,000,000) followers of one host
   seeded with COPY (the seeding of ``bench/identity_followers.py``, reused).
2. identity and notify run as their own processes (``python -m services.<svc>.main``).
3. A reminder is scheduled (ScheduleReminder) to fall due ``BENCH_REMINDER_AFTER_S``
   (default 2 s) after the start, i.e. in the middle of the fan-out; then a
   SpaceStartedEvent is appended to ``spaces:events:rooms`` in the outbox relay's format.
4. When the job is done: ``fanout_s`` is the time from appending the event to the job's
   finish (database clock), ``notifications_per_s`` = notifications created / fanout_s,
   and ``reminder_lateness_s`` = sent_time - fire_time of the reminder.
5. notify is stopped, its tables emptied, and the next run starts: ``BENCH_RUNS`` (default
   3) runs per variant, the variants taking turns (run 1 of each, then run 2 of each...),
   so a noisy neighbour hurts them alike. The headline figures are the medians of the first
   variant.

Variants: ``BENCH_VARIANTS`` is a JSON object {name: {NOTIFY_SETTING: value}}, e.g.
``{"writers1": {"NOTIFY_FANOUT_WRITERS": "1"}, "writers2": {}}``; default: one variant,
``default``, with notify's default settings. The key ``BENCH_CODE_ROOT`` runs that
variant's notify from another checkout (with ``build/gen``), e.g. the previous commit's
(``git archive HEAD services | tar -x -C /tmp/old && ln -s $PWD/build /tmp/old/build``):
notify's schema is dropped after every run, so each variant migrates its own.

Bounded (each wait gives up after ``BENCH_TIMEOUT_S``, default 300 s), loopback only,
cleans up after itself. Last stdout line: one JSON object.
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
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psycopg
import redis
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "build" / "gen")]

from spaces.notify.v1 import notify_resources_pb2 as notify_res  # noqa: E402
from spaces.notify.v1 import notify_service_pb2 as notify_pb  # noqa: E402
from spaces.notify.v1 import notify_service_pb2_grpc as notify_grpc  # noqa: E402
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events  # noqa: E402
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_pb  # noqa: E402

from bench.identity_followers import data_stores, free_port, identity_process, seed  # noqa: E402
from services.common.auth import ServiceTokenIssuer  # noqa: E402
from services.common.events import stream_name  # noqa: E402
from services.common.migrations import migrate  # noqa: E402
from services.identity.main import MIGRATIONS, SCHEMA  # noqa: E402

logger = logging.getLogger("bench.notify_fanout")

FOLLOWERS = int(os.environ.get("BENCH_FOLLOWERS", "1000000"))
REMINDER_AFTER_S = float(os.environ.get("BENCH_REMINDER_AFTER_S", "2.0"))
TIMEOUT_S = float(os.environ.get("BENCH_TIMEOUT_S", "300"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
VARIANTS: dict[str, dict[str, str]] = json.loads(
    os.environ.get("BENCH_VARIANTS", '{"default": {}}')
)


@contextlib.contextmanager
def notify_process(
    env: dict[str, str], port: int, code_root: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """notify (from ``code_root``) as its own process, up to SERVING; SIGTERM (then
    SIGKILL) at the end."""
    log = tempfile.TemporaryFile()
    env = {
        **env,
        "PYTHONPATH": os.pathsep.join([str(code_root), str(code_root / "build" / "gen")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.notify.main"],
        cwd=code_root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"notify exited: {log.read()[-3000:].decode(errors='replace')}")
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
                raise TimeoutError("notify did not become SERVING within 60 s")
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


def stamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(when)
    return result


async def schedule_reminder(port: int, token: str, user: str, fire: dt.datetime) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = notify_grpc.NotifyServiceStub(channel)
        await stub.ScheduleReminder(
            notify_pb.ScheduleReminderRequest(
                space="spaces/bench-later",
                user=f"users/{user}",
                kind=notify_res.REMINDER_KIND_HOST,
                fire_time=stamp(fire),
            ),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )


def append_started(redis_url: str, host: str) -> dt.datetime:
    """Append a SpaceStartedEvent as rooms' outbox relay would; return when."""
    event = rooms_events.SpaceStartedEvent(
        space_id="bench-live",
        host_id=host,
        title="A million listeners",
        visibility=rooms_pb.SPACE_VISIBILITY_EVERYONE,
    )
    appended = dt.datetime.now(dt.UTC)
    event.event_time.CopyFrom(stamp(appended))
    client = redis.Redis.from_url(redis_url)
    try:
        client.xadd(
            stream_name("rooms"),
            {
                "id": str(uuid.uuid4()),
                "type": "space.started",
                "key": "spaces/bench-live",
                "ts": appended.isoformat(),
                "payload_type": event.DESCRIPTOR.full_name,
                "data": event.SerializeToString(),
            },
        )
    finally:
        client.close()
    return appended


def wait_done(database_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_S
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET search_path TO notify")
        while True:
            row = conn.execute(
                "SELECT state, finish_time, created, batches FROM fanout_jobs"
            ).fetchone()
            reminder = conn.execute("SELECT fire_time, sent_time FROM reminders").fetchone()
            if row is not None and row[0] == 2 and reminder is not None and reminder[1]:
                return {
                    "finish": row[1],
                    "created": row[2],
                    "batches": row[3],
                    "fire": reminder[0],
                    "sent": reminder[1],
                }
            if time.monotonic() > deadline:
                raise TimeoutError(f"fan-out not done within {TIMEOUT_S} s: {row}")
            time.sleep(0.05)


def reset(database_url: str) -> None:
    """Drop notify's schema between runs: the next notify migrates a fresh one."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS notify CASCADE")


def one_run(
    notify_env: dict[str, str],
    notify_port: int,
    secret: str,
    host: str,
    database_url: str,
    redis_url: str,
    code_root: Path,
) -> dict[str, Any]:
    """One fan-out with notify started afresh; its figures."""
    with notify_process(notify_env, notify_port, code_root):
        token = ServiceTokenIssuer("rooms", secret).token()
        start = dt.datetime.now(dt.UTC)
        fire = start + dt.timedelta(seconds=REMINDER_AFTER_S)
        asyncio.run(schedule_reminder(notify_port, token, host, fire))
        appended = append_started(redis_url, host)
        result = wait_done(database_url)
    fanout_s = (result["finish"] - appended).total_seconds()
    return {
        "fanout_s": round(fanout_s, 3),
        "notifications_per_s": round(result["created"] / fanout_s),
        "reminder_lateness_s": round((result["sent"] - result["fire"]).total_seconds(), 3),
        "notifications_created": result["created"],
        "batches": result["batches"],
        "reminder_during_fanout": result["fire"] < result["finish"],
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-notify-") as tmp:
        with data_stores(Path(tmp)) as (database_url, redis_url):
            asyncio.run(migrate(database_url, SCHEMA, MIGRATIONS))
            host, seed_s = seed(database_url, FOLLOWERS)
            print(f"seeded {FOLLOWERS} followers in {seed_s:.1f} s", file=sys.stderr)
            secret = secrets.token_urlsafe(48)
            identity_port = free_port()
            base = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "build" / "gen")]),
                "SPACES_DATABASE_URL": database_url,
                "SPACES_REDIS_URL": redis_url,
                "SPACES_INTERNAL_SECRET": secret,
                "SPACES_LOG_LEVEL": "WARNING",
                "SPACES_IDENTITY_ADDR": f"127.0.0.1:{identity_port}",
                "PYTHONUNBUFFERED": "1",
            }
            identity_env = {
                **base,
                "IDENTITY_GRPC_HOST": "127.0.0.1",
                "IDENTITY_GRPC_PORT": str(identity_port),
                "IDENTITY_METRICS_PORT": str(free_port()),
            }
            with identity_process(identity_env, identity_port):
                for number in range(RUNS):
                    for name, settings in VARIANTS.items():
                        overrides = dict(settings)
                        code_root = Path(overrides.pop("BENCH_CODE_ROOT", str(ROOT)))
                        notify_port = free_port()
                        notify_env = {
                            **base,
                            "NOTIFY_GRPC_HOST": "127.0.0.1",
                            "NOTIFY_GRPC_PORT": str(notify_port),
                            "NOTIFY_METRICS_PORT": str(free_port()),
                            "NOTIFY_CONSUMER_NAME": "bench",
                            "NOTIFY_EVENT_BLOCK_MS": "100",
                            **overrides,
                        }
                        run = one_run(
                            notify_env,
                            notify_port,
                            secret,
                            host,
                            database_url,
                            redis_url,
                            code_root,
                        )
                        runs[name].append(run)
                        print(f"run {number + 1} {name}: {json.dumps(run)}", file=sys.stderr)
                        reset(database_url)
    variants = {name: summarize(results) for name, results in runs.items()}
    headline = variants[next(iter(VARIANTS))]
    print(
        json.dumps(
            {
                "followers": FOLLOWERS,
                "fanout_s": headline["fanout_s"],
                "notifications_per_s": headline["notifications_per_s"],
                "reminder_lateness_s": headline["reminder_lateness_s"],
                "runs": RUNS,
                "statistic": "median",
                "notifications_created": headline["notifications_created"],
                "reminder_during_fanout": headline["reminder_during_fanout"],
                "variants": variants if len(variants) > 1 else {},
                "seed_s": round(seed_s, 2),
                "target_notifications_per_s": 100_000,
                "target_reminder_lateness_s": 1.0,
            }
        )
    )


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of one variant's runs (and every run's rate, to show the spread)."""
    return {
        "fanout_s": round(statistics.median(r["fanout_s"] for r in results), 3),
        "notifications_per_s": round(statistics.median(r["notifications_per_s"] for r in results)),
        "reminder_lateness_s": round(
            statistics.median(r["reminder_lateness_s"] for r in results), 3
        ),
        "notifications_created": min(r["notifications_created"] for r in results),
        "reminder_during_fanout": all(r["reminder_during_fanout"] for r in results),
        "notifications_per_s_each_run": [r["notifications_per_s"] for r in results],
    }


if __name__ == "__main__":
    main()
