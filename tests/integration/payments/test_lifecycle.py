"""Offerings, refunds, cancellation, settlement, tips and payouts, driven through gRPC and
rooms' events, with every amount checked to the minor unit."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2
from spaces.common.v1 import money_pb2
from spaces.payments.v1 import payments_events_pb2 as events_pb
from spaces.payments.v1 import payments_resources_pb2 as res
from spaces.payments.v1 import payments_service_pb2 as pb

from services.common.events import StreamEvent, stream_name
from tests.integration.payments.conftest import (
    PaymentsHarness,
    books,
    buy,
    error_reason,
    new_key,
    scalar,
    ticketed_space,
)


def usd(amount: int) -> money_pb2.Money:
    return money_pb2.Money(amount_minor=amount, currency_code="USD")


async def balance_of(h: PaymentsHarness, user: str) -> dict[str, int]:
    response = await h.stub.GetBalance(
        pb.GetBalanceRequest(name="users/me/balance"), metadata=h.as_.user(user)
    )
    for entry in response.balance.balances:
        if entry.currency_code == "USD":
            return {
                "held": entry.held.amount_minor,
                "available": entry.available.amount_minor,
                "pending": entry.payout_pending.amount_minor,
                "paid_out": entry.paid_out.amount_minor,
            }
    return {"held": 0, "available": 0, "pending": 0, "paid_out": 0}


async def payments_events(h: PaymentsHarness, wanted: int) -> list[StreamEvent]:
    """Events payments relayed to its stream (waits until ``wanted`` arrived)."""
    import asyncio

    for _ in range(200):
        entries: Any = await h.app.redis.xrange(stream_name("payments"))
        if len(entries) >= wanted:
            return [StreamEvent.from_entry(i, f) for i, f in entries]
        await asyncio.sleep(0.02)
    raise AssertionError("payments events did not arrive")


async def test_offering_rules(harness: PaymentsHarness) -> None:
    h = harness
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await h.stub.CreateTicketOffering(
            pb.CreateTicketOfferingRequest(
                parent="spaces/ghost",
                ticket_offering=res.TicketOffering(price=usd(500), capacity=5),
                request_id=new_key(),
            ),
            metadata=h.as_.user("host"),
        )
    assert error_reason(unknown.value) == "SPACE_NOT_FOUND"

    start = dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)
    await h.rooms.schedule("jazz", "host", start)
    request = pb.CreateTicketOfferingRequest(
        parent="spaces/jazz",
        ticket_offering=res.TicketOffering(price=usd(500), capacity=2),
        request_id=new_key(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as not_host:
        await h.stub.CreateTicketOffering(request, metadata=h.as_.user("bob"))
    assert not_host.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(not_host.value) == "NOT_HOST"

    created = (
        await h.stub.CreateTicketOffering(request, metadata=h.as_.user("host"))
    ).ticket_offering
    assert created.name == "spaces/jazz/ticketOffering"
    assert created.state == res.TicketOffering.STATE_ON_SALE
    assert created.host == "users/host"
    # Sales end at the Space's start by default.
    assert created.sales_end_time.ToDatetime(tzinfo=dt.UTC) == start.replace(
        microsecond=start.microsecond
    )
    replay = (
        await h.stub.CreateTicketOffering(request, metadata=h.as_.user("host"))
    ).ticket_offering
    assert replay == created
    request.ticket_offering.capacity = 3
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await h.stub.CreateTicketOffering(request, metadata=h.as_.user("host"))
    assert error_reason(reused.value) == "IDEMPOTENCY_KEY_REUSED"
    request.request_id = new_key()
    with pytest.raises(grpc.aio.AioRpcError) as exists:
        await h.stub.CreateTicketOffering(request, metadata=h.as_.user("host"))
    assert exists.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(exists.value) == "TICKET_OFFERING_EXISTS"
    with pytest.raises(grpc.aio.AioRpcError) as currency:
        await h.stub.CreateTicketOffering(
            pb.CreateTicketOfferingRequest(
                parent="spaces/jazz",
                ticket_offering=res.TicketOffering(
                    price=money_pb2.Money(amount_minor=500, currency_code="XTS"), capacity=2
                ),
                request_id=new_key(),
            ),
            metadata=h.as_.user("host"),
        )
    assert error_reason(currency.value) == "UNSUPPORTED_CURRENCY"

    await buy(h, "jazz", "bob", price=500)
    await buy(h, "jazz", "carol", price=500)

    async def update(
        paths: list[str], offering: res.TicketOffering, user: str = "host"
    ) -> res.TicketOffering:
        offering.name = "spaces/jazz/ticketOffering"
        response = await h.stub.UpdateTicketOffering(
            pb.UpdateTicketOfferingRequest(
                ticket_offering=offering, update_mask=field_mask_pb2.FieldMask(paths=paths)
            ),
            metadata=h.as_.user(user),
        )
        return response.ticket_offering

    with pytest.raises(grpc.aio.AioRpcError) as sold_out:
        await buy(h, "jazz", "dave", price=500)
    assert sold_out.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(sold_out.value) == "SOLD_OUT"
    with pytest.raises(grpc.aio.AioRpcError) as below:
        await update(["capacity"], res.TicketOffering(capacity=1))
    assert error_reason(below.value) == "CAPACITY_BELOW_SOLD"
    with pytest.raises(grpc.aio.AioRpcError) as locked:
        await update(["price"], res.TicketOffering(price=usd(700)))
    assert error_reason(locked.value) == "PRICE_LOCKED"
    with pytest.raises(grpc.aio.AioRpcError) as outsider:
        await update(["capacity"], res.TicketOffering(capacity=5), user="bob")
    assert error_reason(outsider.value) == "NOT_HOST"
    bigger = await update(["capacity"], res.TicketOffering(capacity=3))
    assert (bigger.capacity, bigger.sold_count) == (3, 2)
    await buy(h, "jazz", "dave", price=500)

    # Going live closes sales.
    await h.rooms.start("jazz", "host")
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await buy(h, "jazz", "erin", price=500)
    assert error_reason(closed.value) == "SALES_CLOSED"
    with pytest.raises(grpc.aio.AioRpcError) as closed_update:
        await update(["capacity"], res.TicketOffering(capacity=9))
    assert error_reason(closed_update.value) == "SALES_CLOSED"
    got = await h.stub.GetTicketOffering(
        pb.GetTicketOfferingRequest(name="spaces/jazz/ticketOffering"), metadata=h.as_.user("x")
    )
    assert got.ticket_offering.state == res.TicketOffering.STATE_SALES_CLOSED


async def test_refunds_settlement_and_payouts(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h, capacity=10, price=2500)
    tickets = {user: await buy(h, space, user, price=2500) for user in ("bob", "carol", "dave")}
    # 10 % of 2500 = 250: the host nets 2250 per ticket, held until the Space took place.
    assert await balance_of(h, "host") == {
        "held": 6750,
        "available": 0,
        "pending": 0,
        "paid_out": 0,
    }

    with pytest.raises(grpc.aio.AioRpcError) as own:
        await h.stub.RefundTicket(
            pb.RefundTicketRequest(name=tickets["bob"].name), metadata=h.as_.user("bob")
        )
    assert own.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(own.value) == "NOT_HOST"
    with pytest.raises(grpc.aio.AioRpcError) as stranger:
        await h.stub.RefundTicket(
            pb.RefundTicketRequest(name=tickets["bob"].name), metadata=h.as_.user("mallory")
        )
    assert stranger.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_reason(stranger.value) == "TICKET_NOT_FOUND"

    refunded = (
        await h.stub.RefundTicket(
            pb.RefundTicketRequest(name=tickets["bob"].name, note="sorry"),
            metadata=h.as_.user("host"),
        )
    ).ticket
    assert refunded.state == res.Ticket.STATE_REFUNDED
    assert refunded.refund_reason == res.REFUND_REASON_HOST
    again = (
        await h.stub.RefundTicket(
            pb.RefundTicketRequest(name=tickets["bob"].name), metadata=h.as_.user("host")
        )
    ).ticket
    assert again.state == res.Ticket.STATE_REFUNDED
    system = (
        await h.stub.RefundTicket(
            pb.RefundTicketRequest(name=tickets["carol"].name), metadata=h.as_.service()
        )
    ).ticket
    assert system.refund_reason == res.REFUND_REASON_SYSTEM
    assert await scalar(h, "SELECT count(*) FROM sandbox_refunds") == 2
    assert await balance_of(h, "host") == {
        "held": 2250,
        "available": 0,
        "pending": 0,
        "paid_out": 0,
    }

    check = await h.stub.CheckTicket(
        pb.CheckTicketRequest(space=f"spaces/{space}", user="users/bob"), metadata=h.as_.service()
    )
    assert (check.ticket_required, check.has_ticket) == (True, False)
    check = await h.stub.CheckTicket(
        pb.CheckTicketRequest(space=f"spaces/{space}", user="users/dave"), metadata=h.as_.service()
    )
    assert (check.has_ticket, check.ticket) == (True, tickets["dave"].name)

    # Nothing can be paid out before the Space took place.
    with pytest.raises(grpc.aio.AioRpcError) as early:
        await h.stub.RequestPayout(
            pb.RequestPayoutRequest(parent="users/me", amount=usd(1000), request_id=new_key()),
            metadata=h.as_.user("host"),
        )
    assert error_reason(early.value) == "INSUFFICIENT_BALANCE"

    await h.rooms.start(space, "host")
    await h.rooms.end(space, "host")
    assert await balance_of(h, "host") == {
        "held": 0,
        "available": 2250,
        "pending": 0,
        "paid_out": 0,
    }
    settled = await h.stub.SettleSpaceRevenue(
        pb.SettleSpaceRevenueRequest(space=f"spaces/{space}"), metadata=h.as_.service()
    )
    assert [(m.amount_minor, m.currency_code) for m in settled.settled_amounts] == [(2250, "USD")]
    with pytest.raises(grpc.aio.AioRpcError) as settled_refund_all:
        await h.stub.RefundAllTickets(
            pb.RefundAllTicketsRequest(space=f"spaces/{space}"), metadata=h.as_.service()
        )
    assert error_reason(settled_refund_all.value) == "REVENUE_SETTLED"

    payout_key = new_key()
    payout = (
        await h.stub.RequestPayout(
            pb.RequestPayoutRequest(parent="users/me", amount=usd(1250), request_id=payout_key),
            metadata=h.as_.user("host"),
        )
    ).payout
    assert payout.state == res.Payout.STATE_PENDING
    assert await balance_of(h, "host") == {
        "held": 0,
        "available": 1000,
        "pending": 1250,
        "paid_out": 0,
    }
    # After settlement a refund comes out of available, which must cover it.
    with pytest.raises(grpc.aio.AioRpcError) as short:
        await h.stub.RefundTicket(
            pb.RefundTicketRequest(name=tickets["dave"].name), metadata=h.as_.user("host")
        )
    assert error_reason(short.value) == "INSUFFICIENT_BALANCE"

    await h.app.worker.run_once()
    paid = (
        await h.stub.GetPayout(pb.GetPayoutRequest(name=payout.name), metadata=h.as_.user("host"))
    ).payout
    assert paid.state == res.Payout.STATE_PAID
    assert paid.HasField("complete_time")
    replay = await h.stub.RequestPayout(
        pb.RequestPayoutRequest(parent="users/me", amount=usd(1250), request_id=payout_key),
        metadata=h.as_.user("host"),
    )
    assert replay.payout.name == payout.name
    assert await balance_of(h, "host") == {
        "held": 0,
        "available": 1000,
        "pending": 0,
        "paid_out": 1250,
    }
    listed = await h.stub.ListPayouts(
        pb.ListPayoutsRequest(parent="users/me"), metadata=h.as_.user("host")
    )
    assert [p.name for p in listed.payouts] == [payout.name]

    entries = await h.stub.ListLedgerEntries(
        pb.ListLedgerEntriesRequest(parent="users/me", page_size=3), metadata=h.as_.user("host")
    )
    kinds = [e.kind for e in entries.ledger_entries]
    assert kinds == [
        res.LEDGER_ENTRY_KIND_PAYOUT_PAID,
        res.LEDGER_ENTRY_KIND_PAYOUT_REQUESTED,
        res.LEDGER_ENTRY_KIND_SETTLEMENT,
    ]
    rest = await h.stub.ListLedgerEntries(
        pb.ListLedgerEntriesRequest(
            parent="users/me", page_size=100, page_token=entries.next_page_token
        ),
        metadata=h.as_.user("host"),
    )
    assert len(rest.ledger_entries) == 5  # 3 sales and 2 refunds
    assert rest.next_page_token == ""
    for entry in [*entries.ledger_entries, *rest.ledger_entries]:
        assert sum(p.amount_minor for p in entry.postings) == 0

    events = await payments_events(h, 6)
    types = [e.type for e in events]
    assert types.count("ticket.purchased") == 3
    assert types.count("ticket.refunded") == 2
    assert types.count("payout.paid") == 1
    purchased = events[0].unpack(events_pb.TicketPurchasedEvent)
    assert (purchased.host_id, purchased.sold_count) == ("host", 1)
    report = await books(h)
    assert report.balanced and report.processor_gap == {}, report


async def test_cancellation_refunds_every_ticket_once(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h, capacity=50, price=1000)
    for n in range(30):
        await buy(h, space, f"fan-{n}", price=1000)
    await h.rooms.cancel(space, "host")
    assert await scalar(h, "SELECT count(*) FROM tickets WHERE state = 'refunded'") == 30
    assert (
        await scalar(h, "SELECT count(*) FROM tickets WHERE refund_reason = 'space_canceled'") == 30
    )
    assert await scalar(h, "SELECT count(*) FROM sandbox_refunds") == 30
    assert await scalar(h, "SELECT count(DISTINCT charge_id) FROM sandbox_refunds") == 30
    # Driving it again (as rooms or an operator may) finds nothing left to do.
    again = await h.stub.RefundAllTickets(
        pb.RefundAllTicketsRequest(space=f"spaces/{space}"), metadata=h.as_.service()
    )
    assert (again.refunded_count, again.remaining_count) == (0, 0)
    assert await scalar(h, "SELECT count(*) FROM sandbox_refunds") == 30
    offering = await h.stub.GetTicketOffering(
        pb.GetTicketOfferingRequest(name=f"spaces/{space}/ticketOffering"),
        metadata=h.as_.user("host"),
    )
    assert offering.ticket_offering.state == res.TicketOffering.STATE_CANCELED
    assert offering.ticket_offering.sold_count == 0
    check = await h.stub.CheckTicket(
        pb.CheckTicketRequest(space=f"spaces/{space}", user="users/fan-1"),
        metadata=h.as_.service(),
    )
    assert (check.ticket_required, check.has_ticket) == (False, False)
    with pytest.raises(grpc.aio.AioRpcError) as settle:
        await h.stub.SettleSpaceRevenue(
            pb.SettleSpaceRevenueRequest(space=f"spaces/{space}"), metadata=h.as_.service()
        )
    assert error_reason(settle.value) == "TICKET_OFFERING_CANCELED"
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await buy(h, space, "late", price=1000)
    assert error_reason(closed.value) == "SALES_CLOSED"
    assert await balance_of(h, "host") == {"held": 0, "available": 0, "pending": 0, "paid_out": 0}
    report = await books(h)
    assert report.balanced and report.processor_gap == {}, report
    # Redelivering the event (at-least-once) changes nothing.
    await h.rooms.cancel(space, "host")
    assert await scalar(h, "SELECT count(*) FROM sandbox_refunds") == 30


async def test_tips(harness: PaymentsHarness) -> None:
    h = harness
    await h.rooms.schedule("talk", "host")

    def tip(recipient: str, amount: int = 500, key: str | None = None) -> pb.SendTipRequest:
        return pb.SendTipRequest(
            parent="spaces/talk",
            request_id=key or new_key(),
            recipient=recipient,
            amount=usd(amount),
            message="great show",
            payment_method="tok_visa",
        )

    with pytest.raises(grpc.aio.AioRpcError) as not_live:
        await h.stub.SendTip(tip("users/host"), metadata=h.as_.user("bob"))
    assert error_reason(not_live.value) == "SPACE_NOT_LIVE"
    await h.rooms.start("talk", "host")
    key = new_key()
    sent = (await h.stub.SendTip(tip("users/host", 333, key), metadata=h.as_.user("bob"))).tip
    assert (sent.sender, sent.recipient, sent.amount.amount_minor) == (
        "users/bob",
        "users/host",
        333,
    )
    replay = (await h.stub.SendTip(tip("users/host", 333, key), metadata=h.as_.user("bob"))).tip
    assert replay == sent
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await h.stub.SendTip(tip("users/host", 334, key), metadata=h.as_.user("bob"))
    assert error_reason(reused.value) == "IDEMPOTENCY_KEY_REUSED"
    with pytest.raises(grpc.aio.AioRpcError) as self_tip:
        await h.stub.SendTip(tip("users/host"), metadata=h.as_.user("host"))
    assert self_tip.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(self_tip.value) == "CANNOT_TIP_SELF"
    with pytest.raises(grpc.aio.AioRpcError) as off_stage:
        await h.stub.SendTip(tip("users/carol"), metadata=h.as_.user("bob"))
    assert error_reason(off_stage.value) == "RECIPIENT_NOT_ON_STAGE"
    h.stage.stage["talk"] = {"carol"}
    await h.stub.SendTip(tip("users/carol", 100), metadata=h.as_.user("bob"))
    declined = tip("users/carol")
    declined.payment_method = "tok_chargeDeclinedInsufficientFunds"
    with pytest.raises(grpc.aio.AioRpcError) as funds:
        await h.stub.SendTip(declined, metadata=h.as_.user("bob"))
    assert error_reason(funds.value) == "INSUFFICIENT_FUNDS"
    # 10 % of 333 = 33.3 -> 33 fee, 300 to the host; 10 % of 100 = 10, 90 to carol.
    assert await balance_of(h, "host") == {"held": 300, "available": 0, "pending": 0, "paid_out": 0}
    assert await balance_of(h, "carol") == {"held": 90, "available": 0, "pending": 0, "paid_out": 0}
    events = await payments_events(h, 2)
    tips = [e.unpack(events_pb.TipSentEvent) for e in events if e.type == "tip.sent"]
    assert [(t.tip.recipient, t.tip.message) for t in tips] == [
        ("users/host", "great show"),
        ("users/carol", "great show"),
    ]
    await h.rooms.end("talk", "host")
    assert await balance_of(h, "host") == {"held": 0, "available": 300, "pending": 0, "paid_out": 0}
    assert await balance_of(h, "carol") == {"held": 0, "available": 90, "pending": 0, "paid_out": 0}
    assert (
        await scalar(
            h, "SELECT sum(amount_minor) FROM postings WHERE account = 'platform/accounts/fees'"
        )
        == 43
    )
    report = await books(h)
    assert report.balanced and report.processor_gap == {}, report
