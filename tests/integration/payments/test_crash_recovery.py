"""payments as a real process, SIGKILLed in the middle of a Space's mass refund and then
restarted: every ticket ends refunded exactly once (one processor refund, one ledger
entry, one event each) and the books balance."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc.aio
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from spaces.common.v1 import money_pb2
from spaces.payments.v1 import payments_resources_pb2 as res
from spaces.payments.v1 import payments_service_pb2 as pb
from spaces.payments.v1 import payments_service_pb2_grpc as pb_grpc
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events

from services.common import outbox
from services.common.db import create_pool
from services.common.events import StreamEvent, stream_name
from services.common.migrations import migrate
from services.common.redis import create_redis
from services.payments.ledger import check_books_at
from tests.helpers.tokens import TEST_INTERNAL_SECRET, SigningKey, jwks
from tests.integration.payments.conftest import timestamp

ROOT = Path(__file__).resolve().parents[3]
TICKETS = 80


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def payments_process(
    env: dict[str, str], port: int
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.payments.main",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert process.returncode is None, "payments exited during start-up"
                assert time.monotonic() < deadline, "payments did not start"
                await asyncio.sleep(0.1)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def count(url: str, query: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute("SET search_path TO payments")
        cursor = await conn.execute(query)
        row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0


async def test_sigkill_during_mass_refund_then_restart_refunds_each_ticket_once(
    database_url: str, redis_url: str, signing_key: SigningKey
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SPACES_DATABASE_URL": database_url,
        "SPACES_REDIS_URL": redis_url,
        "SPACES_INTERNAL_SECRET": TEST_INTERNAL_SECRET,
        "SPACES_LOG_FORMAT": "text",
        "SPACES_LOG_LEVEL": "WARNING",
        "PAYMENTS_GRPC_HOST": "127.0.0.1",
        "PAYMENTS_GRPC_PORT": str(port),
        "PAYMENTS_METRICS_PORT": "0",
        "PAYMENTS_JWKS_JSON": json.dumps(jwks(signing_key)),
        "PAYMENTS_CONSUMER_NAME": "payments-crash-test",
        "PAYMENTS_CONSUMER_CLAIM_IDLE_MS": "300",
        "PAYMENTS_WORKER_INTERVAL_S": "0.2",
        "PAYMENTS_REFUND_BATCH_SIZE": "10",
        # No rooms runs here: payments cannot ask it who may see a Space.
        "PAYMENTS_VISIBILITY_CHECK": "false",
        # Slow refunds down so the kill lands in the middle of the batch.
        "PAYMENTS_SANDBOX_LATENCY_MS": "25",
        "PYTHONUNBUFFERED": "1",
    }
    await migrate(database_url, "rooms", None)
    rooms_pool = await create_pool(database_url, "rooms", min_size=1, max_size=2)
    client = create_redis(redis_url)
    relay = outbox.OutboxRelay(database_url, "rooms", client, "rooms", poll_interval_s=0.02)
    relay.start()

    async def publish(event_type: str, payload: object) -> None:
        async with rooms_pool.connection() as conn, conn.transaction():
            await outbox.append(conn, event_type, "spaces/crash", payload)  # type: ignore[arg-type]

    try:
        async with payments_process(env, port) as first:
            await publish(
                "space.scheduled",
                rooms_events.SpaceScheduledEvent(
                    space_id="crash",
                    host_id="host",
                    scheduled_start_time=timestamp(dt.datetime.now(dt.UTC) + dt.timedelta(days=1)),
                    ticketed=True,
                ),
            )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.PaymentsServiceStub(channel)
                price = money_pb2.Money(amount_minor=1200, currency_code="USD")
                host_md = (("authorization", f"Bearer {signing_key.mint('host')}"),)
                deadline = time.monotonic() + 20
                while True:  # until payments has projected the Space
                    try:
                        await stub.CreateTicketOffering(
                            pb.CreateTicketOfferingRequest(
                                parent="spaces/crash",
                                ticket_offering=res.TicketOffering(price=price, capacity=500),
                                request_id=str(uuid.uuid4()),
                            ),
                            metadata=host_md,
                            timeout=10,
                        )
                        break
                    except grpc.aio.AioRpcError as error:
                        assert error.code() is grpc.StatusCode.NOT_FOUND, error
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.05)
                gate = asyncio.Semaphore(20)

                async def purchase(n: int) -> None:
                    async with gate:
                        await stub.PurchaseTicket(
                            pb.PurchaseTicketRequest(
                                parent="spaces/crash",
                                request_id=str(uuid.uuid4()),
                                payment_method="tok_visa",
                                price=price,
                            ),
                            metadata=(("authorization", f"Bearer {signing_key.mint(f'fan-{n}')}"),),
                            timeout=30,
                        )

                await asyncio.gather(*(purchase(n) for n in range(TICKETS)))
            assert (
                await count(database_url, "SELECT count(*) FROM tickets WHERE state = 'paid'")
                == TICKETS
            )

            await publish(
                "space.canceled",
                rooms_events.SpaceCanceledEvent(space_id="crash", host_id="host", ticketed=True),
            )
            deadline = time.monotonic() + 30
            while await count(database_url, "SELECT count(*) FROM sandbox_refunds") < 10:
                assert time.monotonic() < deadline, "the mass refund did not start"
                await asyncio.sleep(0.005)
            first.send_signal(signal.SIGKILL)
            await first.wait()

        refunded_at_kill = await count(
            database_url, "SELECT count(*) FROM tickets WHERE state = 'refunded'"
        )
        # At least 10 processor refunds had happened (waited for above); the rest were not
        # started, or caught between the processor's refund and its confirmation.
        assert refunded_at_kill < TICKETS, "the kill did not land mid-refund"

        async with payments_process(env, port) as second:
            deadline = time.monotonic() + 60
            while (
                await count(database_url, "SELECT count(*) FROM tickets WHERE state = 'refunded'")
                < TICKETS
            ):
                assert time.monotonic() < deadline, "the restarted payments did not finish"
                await asyncio.sleep(0.1)
            # Let the relay deliver the last events, then stop gracefully.
            deadline = time.monotonic() + 20
            while await count(database_url, "SELECT count(*) FROM outbox") > 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            second.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.wait(), timeout=20) == 0

        assert await count(database_url, "SELECT count(*) FROM sandbox_refunds") == TICKETS
        assert (
            await count(database_url, "SELECT count(DISTINCT charge_id) FROM sandbox_refunds")
            == TICKETS
        )
        assert (
            await count(
                database_url,
                "SELECT count(*) FROM journal_entries"
                " WHERE kind = 'LEDGER_ENTRY_KIND_TICKET_REFUND'",
            )
            == TICKETS
        )
        entries: Any = await client.xrange(stream_name("payments"))
        refunded_events = [
            StreamEvent.from_entry(i, f) for i, f in entries if f[b"type"] == b"ticket.refunded"
        ]
        assert len(refunded_events) == TICKETS
        assert len({e.key for e in refunded_events}) == TICKETS
        report = await check_books_at(database_url)
        assert report.balanced and report.processor_gap == {}, report
        held = await count(
            database_url,
            "SELECT coalesce(sum(amount_minor), 0) FROM postings WHERE account LIKE 'users/host/%'",
        )
        assert held == 0
    finally:
        await relay.stop()
        await client.aclose()
        await rooms_pool.close()
