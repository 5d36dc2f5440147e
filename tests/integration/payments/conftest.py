"""Payments in-process (port 0) on real PostgreSQL and Valkey, with rooms' events produced
the real way: appended to a ``rooms`` schema outbox and moved by the real OutboxRelay."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import message as pb_message
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import SecretStr
from spaces.payments.v1 import payments_service_pb2_grpc as pb_grpc
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events

from services.common import outbox
from services.common.auth import ServiceTokenIssuer, StaticJwksSource
from services.common.db import Pool, create_pool
from services.common.migrations import migrate
from services.common.settings import CommonSettings
from services.payments.main import PaymentsApp, create_app
from services.payments.settings import PaymentsSettings
from services.payments.stage import StaticStageDirectory
from tests.helpers.tokens import TEST_INTERNAL_SECRET, SigningKey, jwks


def payments_settings(**overrides: Any) -> PaymentsSettings:
    values: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": None,
        "shutdown_grace_s": 0.5,
        "sandbox_timeout_s": 0.05,
        "processor_timeout_s": 2.0,
        "consumer_name": "payments-test",
        "db_pool_max_size": 20,
        **overrides,
    }
    return PaymentsSettings(**values)


def timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def error_reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {error}")


@dataclass
class RoomsFeed:
    """Publishes rooms' outbox events and waits until payments has applied them."""

    pool: Pool
    payments_pool: Pool
    relay: outbox.OutboxRelay
    sent: list[uuid.UUID] = field(default_factory=list)

    async def publish(self, event_type: str, key: str, payload: pb_message.Message) -> uuid.UUID:
        async with self.pool.connection() as conn, conn.transaction():
            event_id = await outbox.append(conn, event_type, key, payload)
        self.sent.append(event_id)
        return event_id

    async def applied(self, event_id: uuid.UUID, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            async with self.payments_pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT 1 FROM processed_events WHERE event_id = %s", (event_id,)
                )
                if await cursor.fetchone() is not None:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"payments did not apply event {event_id}")
            await asyncio.sleep(0.02)

    async def send(self, event_type: str, key: str, payload: pb_message.Message) -> None:
        await self.applied(await self.publish(event_type, key, payload))

    async def schedule(self, space_id: str, host_id: str, start: dt.datetime | None = None) -> None:
        start = start or dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        await self.send(
            "space.scheduled",
            f"spaces/{space_id}",
            rooms_events.SpaceScheduledEvent(
                space_id=space_id,
                host_id=host_id,
                title="Jazz night",
                scheduled_start_time=timestamp(start),
                ticketed=True,
                event_time=timestamp(dt.datetime.now(dt.UTC)),
            ),
        )

    async def start(self, space_id: str, host_id: str) -> None:
        await self.send(
            "space.started",
            f"spaces/{space_id}",
            rooms_events.SpaceStartedEvent(space_id=space_id, host_id=host_id, ticketed=True),
        )

    async def end(self, space_id: str, host_id: str) -> None:
        await self.send(
            "space.ended",
            f"spaces/{space_id}",
            rooms_events.SpaceEndedEvent(space_id=space_id, host_id=host_id, ticketed=True),
        )

    async def cancel(self, space_id: str, host_id: str) -> None:
        await self.send(
            "space.canceled",
            f"spaces/{space_id}",
            rooms_events.SpaceCanceledEvent(space_id=space_id, host_id=host_id, ticketed=True),
        )


class Caller:
    """Signs calls as users (tokens cached) or as a Spaces service."""

    def __init__(self, key: SigningKey) -> None:
        self._key = key
        self._tokens: dict[str, str] = {}
        self._issuer = ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET)

    def user(self, user_id: str) -> tuple[tuple[str, str], ...]:
        token = self._tokens.get(user_id)
        if token is None:
            token = self._tokens[user_id] = self._key.mint(user_id, ttl_s=3600)
        return (("authorization", f"Bearer {token}"),)

    def service(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._issuer.token()}"),)


@dataclass
class PaymentsHarness:
    app: PaymentsApp
    stub: pb_grpc.PaymentsServiceAsyncStub
    rooms: RoomsFeed
    as_: Caller
    stage: StaticStageDirectory


@pytest.fixture
async def harness(
    database_url: str, redis_url: str, signing_key: SigningKey
) -> AsyncIterator[PaymentsHarness]:
    await migrate(database_url, "rooms", None)
    common = CommonSettings(
        database_url=database_url,
        redis_url=redis_url,
        internal_secret=SecretStr(TEST_INTERNAL_SECRET),
        log_format="text",
    )
    stage = StaticStageDirectory()
    app = await create_app(
        payments_settings(),
        common,
        jwks=StaticJwksSource(jwks(signing_key)),
        stage=stage,
        start_worker=False,
    )
    rooms_pool = await create_pool(database_url, "rooms", min_size=1, max_size=4)
    relay = outbox.OutboxRelay(
        database_url, "rooms", app.redis, "rooms", poll_interval_s=0.02, retry_interval_s=0.05
    )
    await app.service.start()
    relay.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.service.port}")
    try:
        yield PaymentsHarness(
            app,
            pb_grpc.PaymentsServiceStub(channel),
            RoomsFeed(rooms_pool, app.pool, relay),
            Caller(signing_key),
            stage,
        )
    finally:
        await channel.close(None)
        await relay.stop()
        await rooms_pool.close()
        await app.service.stop(grace=0)


def new_key() -> str:
    return str(uuid.uuid4())


async def ticketed_space(
    h: PaymentsHarness,
    *,
    host: str = "host",
    capacity: int = 10,
    price: int = 1500,
    currency: str = "USD",
    space_id: str | None = None,
) -> str:
    """Schedule a Space (through rooms' events) and put its tickets on sale."""
    from spaces.common.v1 import money_pb2
    from spaces.payments.v1 import payments_resources_pb2 as res
    from spaces.payments.v1 import payments_service_pb2 as pb

    space_id = space_id or f"s{uuid.uuid4().hex[:12]}"
    await h.rooms.schedule(space_id, host)
    await h.stub.CreateTicketOffering(
        pb.CreateTicketOfferingRequest(
            parent=f"spaces/{space_id}",
            ticket_offering=res.TicketOffering(
                price=money_pb2.Money(amount_minor=price, currency_code=currency),
                capacity=capacity,
            ),
            request_id=new_key(),
        ),
        metadata=h.as_.user(host),
    )
    return space_id


async def buy(
    h: PaymentsHarness,
    space_id: str,
    user: str,
    *,
    price: int = 1500,
    currency: str = "USD",
    card: str = "4242424242424242",
    key: str | None = None,
) -> Any:
    from spaces.common.v1 import money_pb2
    from spaces.payments.v1 import payments_service_pb2 as pb

    response = await h.stub.PurchaseTicket(
        pb.PurchaseTicketRequest(
            parent=f"spaces/{space_id}",
            request_id=key or new_key(),
            payment_method=card,
            price=money_pb2.Money(amount_minor=price, currency_code=currency),
        ),
        metadata=h.as_.user(user),
        timeout=30,
    )
    return response.ticket


async def books(h: PaymentsHarness) -> Any:
    from services.payments.ledger import check_books

    async with h.app.pool.connection() as conn:
        return await check_books(conn)


async def scalar(h: PaymentsHarness, query: str, *params: Any) -> Any:
    async with h.app.pool.connection() as conn:
        cursor = await conn.execute(query, params)
        row = await cursor.fetchone()
        return row[0] if row is not None else None
