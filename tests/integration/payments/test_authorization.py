"""Who may call what: the host, a buyer, an outsider and another Spaces service against the
offering, ticket, refund, balance and payout RPCs, plus the internal-only RPCs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2
from spaces.common.v1 import money_pb2
from spaces.payments.v1 import payments_resources_pb2 as res
from spaces.payments.v1 import payments_service_pb2 as pb

from tests.integration.payments.conftest import (
    PaymentsHarness,
    buy,
    error_reason,
    new_key,
    ticketed_space,
)

OK = "OK"


async def outcome(call: Awaitable[Any]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}:{error_reason(error)}"
    return OK


async def test_authorization_matrix(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h, host="host", capacity=10, price=1000)
    ticket = await buy(h, space, "buyer", price=1000)
    spare = await buy(h, space, "buyer2", price=1000)
    other_space = f"{space}-b"
    await h.rooms.schedule(other_space, "host")
    canceled_space = f"{space}-c"
    await h.rooms.schedule(canceled_space, "host")

    actors: dict[str, tuple[tuple[str, str], ...]] = {
        "host": h.as_.user("host"),
        "buyer": h.as_.user("buyer"),
        "outsider": h.as_.user("outsider"),
        "service": h.as_.service(),
    }
    usd = money_pb2.Money(amount_minor=1000, currency_code="USD")
    stub = h.stub
    rpcs: dict[str, Callable[[Any], Awaitable[Any]]] = {
        "CreateTicketOffering": lambda md: stub.CreateTicketOffering(
            pb.CreateTicketOfferingRequest(
                parent=f"spaces/{other_space}",
                ticket_offering=res.TicketOffering(price=usd, capacity=5),
                request_id=new_key(),
            ),
            metadata=md,
        ),
        "UpdateTicketOffering": lambda md: stub.UpdateTicketOffering(
            pb.UpdateTicketOfferingRequest(
                ticket_offering=res.TicketOffering(
                    name=f"spaces/{space}/ticketOffering", capacity=20
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["capacity"]),
            ),
            metadata=md,
        ),
        "GetTicketOffering": lambda md: stub.GetTicketOffering(
            pb.GetTicketOfferingRequest(name=f"spaces/{space}/ticketOffering"), metadata=md
        ),
        "GetTicket": lambda md: stub.GetTicket(pb.GetTicketRequest(name=ticket.name), metadata=md),
        "RefundTicket": lambda md: stub.RefundTicket(
            pb.RefundTicketRequest(name=spare.name), metadata=md
        ),
        "GetBalance": lambda md: stub.GetBalance(
            pb.GetBalanceRequest(name="users/host/balance"), metadata=md
        ),
        "ListLedgerEntries": lambda md: stub.ListLedgerEntries(
            pb.ListLedgerEntriesRequest(parent="users/host"), metadata=md
        ),
        "RequestPayout": lambda md: stub.RequestPayout(
            pb.RequestPayoutRequest(
                parent="users/host",
                amount=money_pb2.Money(amount_minor=1000, currency_code="USD"),
                request_id=new_key(),
            ),
            metadata=md,
        ),
        "ListPayouts": lambda md: stub.ListPayouts(
            pb.ListPayoutsRequest(parent="users/host"), metadata=md
        ),
        "CheckTicket": lambda md: stub.CheckTicket(
            pb.CheckTicketRequest(space=f"spaces/{space}", user="users/buyer"), metadata=md
        ),
        "SettleSpaceRevenue": lambda md: stub.SettleSpaceRevenue(
            pb.SettleSpaceRevenueRequest(space=f"spaces/{other_space}"), metadata=md
        ),
        "RefundAllTickets": lambda md: stub.RefundAllTickets(
            pb.RefundAllTicketsRequest(space=f"spaces/{canceled_space}"), metadata=md
        ),
    }
    denied_host = "PERMISSION_DENIED:NOT_HOST"
    denied_owner = "PERMISSION_DENIED:NOT_OWNER"
    internal = "PERMISSION_DENIED:INTERNAL_ONLY"
    hidden = "NOT_FOUND:TICKET_NOT_FOUND"
    expected: dict[str, dict[str, str]] = {
        # rpc: host, buyer, outsider, service
        "CreateTicketOffering": dict(
            host=OK, buyer=denied_host, outsider=denied_host, service=denied_host
        ),
        "UpdateTicketOffering": dict(
            host=OK, buyer=denied_host, outsider=denied_host, service=denied_host
        ),
        "GetTicketOffering": dict(host=OK, buyer=OK, outsider=OK, service=OK),
        "GetTicket": dict(host=OK, buyer=OK, outsider=hidden, service=OK),
        "GetBalance": dict(host=OK, buyer=denied_owner, outsider=denied_owner, service=OK),
        "ListLedgerEntries": dict(host=OK, buyer=denied_owner, outsider=denied_owner, service=OK),
        # The host has nothing available yet: allowed, then refused for the balance.
        "RequestPayout": dict(
            host="FAILED_PRECONDITION:INSUFFICIENT_BALANCE",
            buyer=denied_owner,
            outsider=denied_owner,
            service=denied_owner,
        ),
        "ListPayouts": dict(host=OK, buyer=denied_owner, outsider=denied_owner, service=OK),
        "CheckTicket": dict(host=internal, buyer=internal, outsider=internal, service=OK),
        "SettleSpaceRevenue": dict(host=internal, buyer=internal, outsider=internal, service=OK),
        "RefundAllTickets": dict(host=internal, buyer=internal, outsider=internal, service=OK),
    }
    seen: dict[str, dict[str, str]] = {}
    for rpc, by_actor in expected.items():
        seen[rpc] = {}
        for actor in ("buyer", "outsider", "service", "host"):
            if rpc == "CreateTicketOffering" and actor == "host":
                continue  # checked last, once: an offering can be created only once
            seen[rpc][actor] = await outcome(rpcs[rpc](actors[actor]))
        if rpc == "CreateTicketOffering":
            seen[rpc]["host"] = await outcome(rpcs[rpc](actors["host"]))
    assert seen == expected

    # Refunds: buyers cannot refund themselves, strangers cannot see the ticket, the host can.
    assert await outcome(rpcs["RefundTicket"](h.as_.user("buyer2"))) == denied_host
    assert await outcome(rpcs["RefundTicket"](actors["outsider"])) == hidden
    assert await outcome(rpcs["RefundTicket"](actors["host"])) == OK

    # Listing a Space's tickets: all for the host, one's own for anyone else.
    async def names(md: Any) -> list[str]:
        response = await stub.ListTickets(
            pb.ListTicketsRequest(parent=f"spaces/{space}"), metadata=md
        )
        return sorted(t.owner for t in response.tickets)

    assert await names(actors["host"]) == ["users/buyer", "users/buyer2"]
    assert await names(actors["buyer"]) == ["users/buyer"]
    assert await names(actors["outsider"]) == []
    mine = await stub.ListTickets(
        pb.ListTicketsRequest(parent="spaces/-"), metadata=actors["buyer"]
    )
    assert [t.name for t in mine.tickets] == [ticket.name]

    # No token at all.
    assert await outcome(stub.GetBalance(pb.GetBalanceRequest(name="users/me/balance"))) == (
        "UNAUTHENTICATED:UNAUTHENTICATED"
    )
