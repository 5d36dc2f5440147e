"""A ticketed Space against the real payments service, running as its own process.

Rooms runs in-process (with the media double: media has no process yet); payments is the
real ``services.payments.main`` process started by ``tools/devstack.py``'s ``Stack`` on the
test's PostgreSQL and Valkey. Payments learns of the Space from rooms' outbox events (as in
production), sells a ticket with the sandbox card, and answers rooms' CheckTicket on join.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from pydantic import SecretStr
from spaces.common.v1 import money_pb2
from spaces.payments.v1 import payments_resources_pb2 as pay_res
from spaces.payments.v1 import payments_service_pb2 as pay_pb
from spaces.payments.v1 import payments_service_pb2_grpc as pay_grpc
from spaces.rooms.v1 import rooms_service_pb2 as pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as pb_grpc

from services.common.settings import CommonSettings
from tests.helpers.rooms_doubles import RecordingMediaControl, TicketBook, running_media
from tests.helpers.tokens import TEST_INTERNAL_SECRET
from tests.integration.identity.harness import running_identity
from tests.integration.rooms.harness import RoomsHarness, reason, started_rooms
from tools.devstack import Stack

WAIT_S = 30.0  # only a failure waits this long
PRICE = money_pb2.Money(amount_minor=500, currency_code="USD")
CARD = "4242424242424242"


@pytest.fixture
async def with_payments(
    database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[RoomsHarness, pay_grpc.PaymentsServiceStub]]:
    media = RecordingMediaControl()
    async with running_identity(database_url, redis_url) as identity, running_media(media) as m:
        stack = Stack(
            tmp_path / "stack",
            auto_ports=True,
            only=("payments",),
            extra_env={
                "SPACES_INTERNAL_SECRET": TEST_INTERNAL_SECRET,
                "SPACES_IDENTITY_ADDR": f"127.0.0.1:{identity.service.port}",
                # This rooms runs in the test process, not where payments looks for it.
                "PAYMENTS_VISIBILITY_CHECK": "false",
            },
        )
        stack.database_url = database_url
        stack.redis_url = redis_url
        await asyncio.to_thread(stack.start)
        try:
            payments_port = stack.services["payments"].grpc_port
            common = CommonSettings(
                database_url=database_url,
                redis_url=redis_url,
                internal_secret=SecretStr(TEST_INTERNAL_SECRET),
                identity_addr=f"127.0.0.1:{identity.service.port}",
                media_addr=f"127.0.0.1:{m.port}",
                payments_addr=f"127.0.0.1:{payments_port}",
            )
            async with (
                started_rooms(common) as (service, runtime, channel),
                grpc.aio.insecure_channel(f"127.0.0.1:{payments_port}") as pay_channel,
            ):
                yield (
                    RoomsHarness(
                        identity=identity,
                        media=media,
                        payments=TicketBook(),  # unused: payments is the real one
                        service=service,
                        runtime=runtime,
                        stub=pb_grpc.RoomsServiceStub(channel),
                        common=common,
                    ),
                    pay_grpc.PaymentsServiceStub(pay_channel),
                )
            stack.check_alive()
        finally:
            await asyncio.to_thread(stack.stop)


async def offer_tickets(
    rooms: RoomsHarness, payments: pay_grpc.PaymentsServiceStub, space_name: str, host: str
) -> None:
    """Open ticket sales once payments has consumed the Space's space.scheduled event.

    Each attempt has its own request_id: payments remembers a refusal under its key.
    """

    async def until_known() -> None:
        while True:
            request = pay_pb.CreateTicketOfferingRequest(
                parent=space_name,
                ticket_offering=pay_res.TicketOffering(price=PRICE, capacity=10),
                request_id=str(uuid.uuid4()),
            )
            try:
                await payments.CreateTicketOffering(request, metadata=rooms.as_user(host))
                return
            except grpc.aio.AioRpcError as error:
                if reason(error) != "SPACE_NOT_FOUND":
                    raise
                await asyncio.sleep(0.1)

    await asyncio.wait_for(until_known(), WAIT_S)


async def test_ticket_check_against_the_real_payments_process(
    with_payments: tuple[RoomsHarness, pay_grpc.PaymentsServiceStub],
) -> None:
    rooms, payments = with_payments
    host, buyer, freeloader, guest = await rooms.users(4)
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    space = await rooms.create(host, ticketed=True, scheduled_start_time=start)
    await offer_tickets(rooms, payments, space.name, host)
    bought = await payments.PurchaseTicket(
        pay_pb.PurchaseTicketRequest(
            parent=space.name, request_id=str(uuid.uuid4()), payment_method=CARD, price=PRICE
        ),
        metadata=rooms.as_user(buyer),
    )
    assert bought.ticket.name
    await rooms.stub.InviteUsers(
        pb.InviteUsersRequest(name=space.name, users=[f"users/{guest}"]),
        metadata=rooms.as_user(host),
    )
    await rooms.stub.StartSpace(pb.StartSpaceRequest(name=space.name), metadata=rooms.as_user(host))

    assert (await rooms.join(space, buyer)).participant.name
    assert (await rooms.join(space, guest)).participant.name  # invited: no ticket needed
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.join(space, freeloader)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(caught.value) == "TICKET_REQUIRED"
