"""Notify on real PostgreSQL and Valkey, with the real identity service, in-process or as a
subprocess; events are appended to the streams in the outbox relay's format."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc.aio
import psycopg
import redis.asyncio
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from spaces.notify.v1 import notify_service_pb2_grpc as pb_grpc

from services.common.auth import ServiceTokenIssuer
from services.common.events import stream_name
from services.common.ids import new_id
from services.common.server import Service
from services.common.settings import CommonSettings
from services.notify.main import NotifyRuntime, build_service
from services.notify.settings import NotifySettings
from tests.helpers.tokens import TEST_INTERNAL_SECRET
from tests.integration.identity.harness import Identity, bearer

ROOT = Path(__file__).resolve().parents[3]
Metadata = tuple[tuple[str, str], ...]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(when)
    return result


def notify_settings(**overrides: Any) -> NotifySettings:
    """Fast settings for tests: free port, short polls, quick retries."""
    base: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": None,
        "shutdown_grace_s": 0.2,
        "consumer_name": "notify-test",
        "event_claim_idle_ms": 2000,
        "event_block_ms": 100,
        "fanout_idle_poll_s": 0.05,
        "delivery_poll_s": 0.05,
        "reminder_poll_s": 0.1,
        "webhook_backoff_base_s": 0.2,
        "webhook_backoff_cap_s": 1.0,
        "webhook_max_attempts": 3,
        "webhook_timeout_s": 2.0,
    }
    return NotifySettings(**{**base, **overrides})


@dataclass
class Notify:
    """A running notify and a client for it."""

    service: Service
    runtime: NotifyRuntime
    channel: grpc.aio.Channel
    stub: pb_grpc.NotifyServiceAsyncStub

    @property
    def service_metadata(self) -> Metadata:
        return bearer(ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET).token())

    async def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        assert self.runtime.pool is not None
        async with self.runtime.pool.connection() as conn:
            cur = await conn.execute(query, params)
            return list(await cur.fetchall()) if cur.description else []


def common_settings(database_url: str, redis_url: str, identity: Identity) -> CommonSettings:
    return CommonSettings(
        database_url=database_url,
        redis_url=redis_url,
        internal_secret=SecretStr(TEST_INTERNAL_SECRET),
        identity_addr=f"127.0.0.1:{identity.service.port}",
        log_format="text",
    )


@asynccontextmanager
async def running_notify(
    database_url: str, redis_url: str, identity: Identity, **overrides: Any
) -> AsyncIterator[Notify]:
    """Start notify in-process on a free port."""
    service, runtime = build_service(
        notify_settings(**overrides), common_settings(database_url, redis_url, identity)
    )
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield Notify(service, runtime, channel, pb_grpc.NotifyServiceStub(channel))
    finally:
        await channel.close(None)
        await service.stop(grace=0)


class NotifyProcess:
    """``python -m services.notify.main`` as a real process (for SIGKILL)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self._env = env
        self._log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.port = int(env["NOTIFY_GRPC_PORT"])

    async def start(self, timeout: float = 60.0) -> None:
        log = self._log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.notify.main"],
            cwd=ROOT,
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"notify exited:\n{self._log_path.read_text()[-4000:]}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("notify did not become SERVING")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook, no goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def process_env(
    database_url: str, redis_url: str, identity: Identity, **extra: str
) -> dict[str, str]:
    build = ROOT / "build" / "gen"
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(build)]),
        "PYTHONUNBUFFERED": "1",
        "SPACES_DATABASE_URL": database_url,
        "SPACES_REDIS_URL": redis_url,
        "SPACES_INTERNAL_SECRET": TEST_INTERNAL_SECRET,
        "SPACES_IDENTITY_ADDR": f"127.0.0.1:{identity.service.port}",
        "SPACES_LOG_FORMAT": "text",
        "NOTIFY_GRPC_HOST": "127.0.0.1",
        "NOTIFY_GRPC_PORT": str(free_port()),
        "NOTIFY_METRICS_PORT": str(free_port()),
        "NOTIFY_SHUTDOWN_GRACE_S": "0.2",
        "NOTIFY_FANOUT_IDLE_POLL_S": "0.05",
        "NOTIFY_EVENT_BLOCK_MS": "100",
        **extra,
    }


async def publish(
    redis_url: str,
    service: str,
    payload: Message,
    *,
    event_type: str = "test.event",
    key: str = "",
    event_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """Append an event to ``spaces:events:<service>`` in the outbox relay's format."""
    event_id = event_id or uuid.uuid4()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.xadd(
            stream_name(service),
            {
                "id": str(event_id),
                "type": event_type,
                "key": key,
                "ts": dt.datetime.now(dt.UTC).isoformat(),
                "payload_type": payload.DESCRIPTOR.full_name,
                "data": payload.SerializeToString(),
            },
        )
    finally:
        await client.aclose()
    return event_id


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Wait until ``check()`` is true."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def seed_followers(database_url: str, host_id: str, count: int) -> list[str]:
    """Give ``host_id`` ``count`` new followers straight in identity's tables (COPY)."""
    now = dt.datetime.now(dt.UTC).isoformat()
    prefix = new_id()[:16]
    ids = [f"{prefix}{i:08d}" for i in range(count)]
    with psycopg.connect(database_url) as conn:
        conn.execute("SET search_path TO identity")
        with conn.cursor() as cur:
            with cur.copy(
                "COPY users (id, handle, handle_key, display_name, password_hash,"
                " following_count, create_time, update_time) FROM STDIN"
            ) as copy:
                for i, uid in enumerate(ids):
                    copy.write_row(
                        (uid, f"f{prefix}{i}", f"f{prefix}{i}", f"Fan {i}", "x", 1, now, now)
                    )
            with cur.copy("COPY follows (followee_id, follower_id) FROM STDIN") as copy:
                for uid in ids:
                    copy.write_row((host_id, uid))
            cur.execute(
                "UPDATE users SET follower_count = follower_count + %s WHERE id = %s",
                (count, host_id),
            )
        conn.commit()
    return ids


def notify_sql(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Query notify's schema from outside the service."""
    with psycopg.connect(database_url) as conn:
        conn.execute("SET search_path TO notify")
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return list(cur.fetchall()) if cur.description else []


@dataclass
class Received:
    """One request a :class:`Receiver` got."""

    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A real loopback HTTP server answering POSTs with scripted replies.

    Each reply is a status, or a (status, JSON body) pair; the last one repeats. ``replies``
    may be replaced while it runs (a receiver that recovers).
    """

    def __init__(self, replies: list[int | tuple[int, str]]) -> None:
        self.replies = replies
        self.requests: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append(Received(self.path, dict(self.headers), body))
                index = min(len(receiver.requests), len(receiver.replies)) - 1
                reply = receiver.replies[index]
                status, text = reply if isinstance(reply, tuple) else (reply, "")
                payload = text.encode()
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/hook"


@contextmanager
def receiving(replies: list[int | tuple[int, str]]) -> Iterator[Receiver]:
    """Run a :class:`Receiver` for the block."""
    receiver = Receiver(replies)
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
