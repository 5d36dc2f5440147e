"""Requests that stopped half-way (the process died between two steps) are finished by the
worker from the processor's records: booked when money was taken, undone when it was not,
and a client retrying with the same key gets the outcome."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid

import grpc
import grpc.aio
import pytest
from spaces.common.v1 import money_pb2
from spaces.payments.v1 import payments_resources_pb2 as res
from spaces.payments.v1 import payments_service_pb2 as pb

from services.common.ids import new_id
from services.payments import convert, domain
from services.payments.store import ReserveOutcome, TicketRecord, TipRecord
from services.payments.workers import PaymentsWorker
from tests.integration.payments.conftest import (
    PaymentsHarness,
    books,
    buy,
    error_reason,
    scalar,
    ticketed_space,
)

CARD = "4242424242424242"
OLD = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)


def eager_worker(h: PaymentsHarness) -> PaymentsWorker:
    """A worker that treats every unfinished request as abandoned."""
    return PaymentsWorker(
        h.app.payments,
        interval_s=1,
        reservation_timeout_s=0.001,
        retention_s=24 * 3600,
        refund_batch=100,
    )


async def crashed_purchase(h: PaymentsHarness, space: str, buyer: str, *, charged: bool) -> str:
    """Leave what a purchase leaves when its process dies after reserving (and charging)."""
    key = uuid.uuid4()
    store = h.app.store
    fingerprint = domain.fingerprint("purchase", space, CARD, 1500, "USD")
    await store.claim(buyer, key, "PurchaseTicket", fingerprint, lease_s=0.001)
    ticket = TicketRecord(
        id=new_id(),
        space_id=space,
        owner_id=buyer,
        host_id="host",
        price_minor=1500,
        fee_minor=150,
        currency_code="USD",
        state="reserved",
        refund_reason=None,
        refund_note="",
        request_scope=buyer,
        request_id=key,
        processor_key=domain.processor_key("purchase", buyer, str(key)),
        charge_id=None,
        settled=False,
        create_time=OLD,
        refund_time=None,
    )
    outcome, _ = await store.reserve_seat(ticket, 1500, "USD")
    assert outcome is ReserveOutcome.RESERVED
    if charged:
        await h.app.processor.authorize(
            idempotency_key=ticket.processor_key,
            amount_minor=1500,
            currency_code="USD",
            payment_method=CARD,
        )
    await asyncio.sleep(0.01)  # the lease runs out
    return str(key)


async def test_a_purchase_that_died_after_charging_is_completed(
    harness: PaymentsHarness,
) -> None:
    h = harness
    space = await ticketed_space(h, capacity=1)
    key = await crashed_purchase(h, space, "bob", charged=True)
    # The seat is held: nobody else can take it meanwhile.
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await buy(h, space, "carol")
    assert error_reason(full.value) == "SOLD_OUT"
    await eager_worker(h).run_once()
    assert await scalar(h, "SELECT state FROM tickets WHERE owner_id = 'bob'") == "paid"
    assert await scalar(h, "SELECT status FROM sandbox_charges") == "captured"
    # The buyer's retry gets the ticket, without a second charge.
    ticket = await buy(h, space, "bob", key=key)
    assert ticket.state == res.Ticket.STATE_PAID
    assert await scalar(h, "SELECT count(*) FROM sandbox_charges") == 1
    report = await books(h)
    assert report.balanced and report.processor_gap == {}, report


async def test_a_purchase_that_died_before_charging_gives_the_seat_back(
    harness: PaymentsHarness,
) -> None:
    h = harness
    space = await ticketed_space(h, capacity=1)
    key = await crashed_purchase(h, space, "bob", charged=False)
    await eager_worker(h).run_once()
    assert await scalar(h, "SELECT count(*) FROM tickets") == 0
    assert await scalar(h, "SELECT reserved_count FROM ticket_offerings") == 0
    # No money was taken, so the same key may simply try again.
    ticket = await buy(h, space, "bob", key=key)
    assert ticket.state == res.Ticket.STATE_PAID
    assert (await books(h)).balanced


async def test_a_tip_that_died_after_charging_is_completed(harness: PaymentsHarness) -> None:
    h = harness
    await h.rooms.schedule("live", "host")
    await h.rooms.start("live", "host")
    key = uuid.uuid4()
    store = h.app.store
    await store.claim(
        "bob",
        key,
        "SendTip",
        domain.fingerprint("tip", "live", "host", 700, "USD", "", "tok_visa"),
        lease_s=0.001,
    )
    tip = await store.begin_tip(
        TipRecord(
            id=new_id(),
            space_id="live",
            sender_id="bob",
            recipient_id="host",
            amount_minor=700,
            fee_minor=70,
            currency_code="USD",
            message="",
            state="pending",
            request_scope="bob",
            request_id=key,
            processor_key=domain.processor_key("tip", "bob", str(key)),
            charge_id=None,
            settled=False,
            create_time=OLD,
        )
    )
    await h.app.processor.authorize(
        idempotency_key=tip.processor_key,
        amount_minor=700,
        currency_code="USD",
        payment_method="tok_visa",
    )
    await asyncio.sleep(0.01)
    await eager_worker(h).run_once()
    assert await scalar(h, "SELECT state FROM tips") == "paid"
    replay = await h.stub.SendTip(
        pb.SendTipRequest(
            parent="spaces/live",
            request_id=str(key),
            recipient="users/host",
            amount=money_pb2.Money(amount_minor=700, currency_code="USD"),
            payment_method="tok_visa",
        ),
        metadata=h.as_.user("bob"),
    )
    assert replay.tip.name == domain.tip_name("live", tip.id)
    assert await scalar(h, "SELECT count(*) FROM sandbox_charges") == 1
    report = await books(h)
    assert report.balanced and report.processor_gap == {}, report


async def test_a_failed_payout_returns_the_money(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h, capacity=5, price=2000)
    for user in ("a1", "a2"):
        await buy(h, space, user, price=2000)
    await h.rooms.start(space, "host")
    await h.rooms.end(space, "host")
    payout = await h.stub.RequestPayout(
        pb.RequestPayoutRequest(
            parent="users/host",
            amount=money_pb2.Money(amount_minor=3000, currency_code="USD"),
            request_id=str(uuid.uuid4()),
        ),
        metadata=h.as_.user("host"),
    )
    (pending,) = await h.app.store.pending_payouts(10)
    # The processor refusing it (the sandbox's bank always accepts, so book it by hand).
    now = dt.datetime.now(dt.UTC)
    name = payout.payout.name
    failed = await h.app.store.complete_payout(
        pending.id,
        False,
        "account_closed",
        now,
        domain.payout_failed_entry(name, pending.id, "host", 3000, "USD"),
        lambda p: convert.payout_completed(p, now),
    )
    assert failed is not None and failed.state == "failed"
    got = await h.stub.GetPayout(pb.GetPayoutRequest(name=name), metadata=h.as_.user("host"))
    assert got.payout.state == res.Payout.STATE_FAILED
    assert got.payout.failure_reason == "account_closed"
    balance = await h.stub.GetBalance(
        pb.GetBalanceRequest(name="users/me/balance"), metadata=h.as_.user("host")
    )
    (usd,) = balance.balance.balances
    assert (usd.available.amount_minor, usd.payout_pending.amount_minor) == (3600, 0)
    assert dataclasses.asdict(await books(h))["unbalanced_entries"] == 0
