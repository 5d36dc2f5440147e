"""Ticket purchases through the real gRPC server: capacity under concurrency, idempotency,
declines, timeouts and reconciliation, exact amounts."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import grpc.aio
import pytest
from prometheus_client import REGISTRY
from spaces.payments.v1 import payments_resources_pb2 as res
from spaces.payments.v1 import payments_service_pb2 as pb

from services.payments.processor import TestCards
from tests.integration.payments.conftest import (
    PaymentsHarness,
    books,
    buy,
    error_reason,
    new_key,
    scalar,
    ticketed_space,
)


async def test_a_purchase_books_the_sale_exactly(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h, capacity=5, price=1999)
    ticket = await buy(h, space, "bob", price=1999)
    assert ticket.state == res.Ticket.STATE_PAID
    assert ticket.owner == "users/bob"
    assert ticket.price.amount_minor == 1999
    # 10 % of 1999 = 199.9, rounded half up: 200 to the platform, 1799 held for the host.
    balance = await h.stub.GetBalance(
        pb.GetBalanceRequest(name="users/me/balance"), metadata=h.as_.user("host")
    )
    (usd,) = balance.balance.balances
    assert (usd.currency_code, usd.held.amount_minor, usd.available.amount_minor) == (
        "USD",
        1799,
        0,
    )
    offering = await h.stub.GetTicketOffering(
        pb.GetTicketOfferingRequest(name=f"spaces/{space}/ticketOffering"),
        metadata=h.as_.user("carol"),
    )
    assert offering.ticket_offering.sold_count == 1
    entries = await h.stub.ListLedgerEntries(
        pb.ListLedgerEntriesRequest(parent="users/me"), metadata=h.as_.user("host")
    )
    (sale,) = entries.ledger_entries
    assert sale.kind == res.LEDGER_ENTRY_KIND_TICKET_SALE
    assert sale.subject == ticket.name
    assert sorted((p.account, p.amount_minor) for p in sale.postings) == [
        ("platform/accounts/fees", 200),
        ("processor/accounts/clearing", -1999),
        ("users/host/accounts/held", 1799),
    ]
    report = await books(h)
    assert report.balanced, report
    assert report.processor_gap == {}
    await h.app.worker.check_ledger()
    assert REGISTRY.get_sample_value("spaces_payments_ledger_imbalance") == 0
    assert REGISTRY.get_sample_value("spaces_payments_purchases_total", {"result": "ok"})


async def test_concurrent_purchases_never_oversell(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h, capacity=100, price=1000)
    gate = asyncio.Semaphore(50)

    async def attempt(n: int) -> str:
        async with gate:
            try:
                await buy(h, space, f"buyer-{n}", price=1000)
            except grpc.aio.AioRpcError as error:
                return f"{error.code().name}:{error_reason(error)}"
            return "OK"

    outcomes = Counter(await asyncio.gather(*(attempt(n) for n in range(1000))))
    assert outcomes == {"OK": 100, "RESOURCE_EXHAUSTED:SOLD_OUT": 900}
    assert await scalar(h, "SELECT count(*) FROM tickets WHERE state = 'paid'") == 100
    assert await scalar(h, "SELECT sold_count FROM ticket_offerings") == 100
    assert await scalar(h, "SELECT count(*) FROM sandbox_charges") == 100
    report = await books(h)
    assert report.balanced, report
    assert report.currency_totals == {"USD": 0}
    assert (
        await scalar(
            h, "SELECT sum(amount_minor) FROM postings WHERE account = 'users/host/accounts/held'"
        )
        == 100 * 900
    )


async def test_retries_with_the_same_key_never_charge_twice(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h, capacity=3)
    key = new_key()
    first, *repeats = await asyncio.gather(*(buy(h, space, "bob", key=key) for _ in range(8)))
    assert all(repeat == first for repeat in repeats)
    again = await buy(h, space, "bob", key=key)
    assert again == first
    assert await scalar(h, "SELECT count(*) FROM sandbox_charges") == 1
    assert await scalar(h, "SELECT sold_count FROM ticket_offerings") == 1

    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await buy(h, space, "bob", key=key, card="4000000000000077")
    assert reused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(reused.value) == "IDEMPOTENCY_KEY_REUSED"

    with pytest.raises(grpc.aio.AioRpcError) as owned:
        await buy(h, space, "bob")
    assert owned.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(owned.value) == "TICKET_ALREADY_OWNED"

    with pytest.raises(grpc.aio.AioRpcError) as host:
        await buy(h, space, "host")
    assert error_reason(host.value) == "HOST_CANNOT_BUY"

    with pytest.raises(grpc.aio.AioRpcError) as price:
        await buy(h, space, "carol", price=1400)
    assert error_reason(price.value) == "PRICE_CHANGED"

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await buy(h, "nowhere", "carol")
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_reason(missing.value) == "TICKET_OFFERING_NOT_FOUND"
    assert (await books(h)).balanced


@pytest.mark.parametrize(
    ("card", "reason"),
    [
        (TestCards.DECLINED, "CARD_DECLINED"),
        (TestCards.INSUFFICIENT_FUNDS, "INSUFFICIENT_FUNDS"),
        ("tok_chargeDeclined", "CARD_DECLINED"),
        ("4242424242424241", "CARD_DECLINED"),  # fails the Luhn check
    ],
)
async def test_declines_leave_no_ticket(harness: PaymentsHarness, card: str, reason: str) -> None:
    h = harness
    space = await ticketed_space(h, capacity=1)
    key = new_key()
    for _ in range(2):  # the repeat gets the recorded decline, without a second attempt
        with pytest.raises(grpc.aio.AioRpcError) as declined:
            await buy(h, space, "bob", card=card, key=key)
        assert declined.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(declined.value) == reason
    assert await scalar(h, "SELECT count(*) FROM tickets") == 0
    assert await scalar(h, "SELECT sold_count + reserved_count FROM ticket_offerings") == 0
    assert await scalar(h, "SELECT count(*) FROM journal_entries") == 0
    assert await scalar(h, "SELECT count(*) FROM sandbox_charges") <= 1
    # The only seat is free again: a good card gets it.
    await buy(h, space, "bob")
    assert (await books(h)).balanced


async def test_a_timeout_without_a_charge_leaves_nothing(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h, capacity=1)
    key = new_key()
    with pytest.raises(grpc.aio.AioRpcError) as timed_out:
        await buy(h, space, "bob", card=TestCards.TIMEOUT, key=key)
    assert timed_out.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_reason(timed_out.value) == "PROCESSOR_UNAVAILABLE"
    assert await scalar(h, "SELECT count(*) FROM tickets") == 0
    assert await scalar(h, "SELECT sold_count + reserved_count FROM ticket_offerings") == 0
    assert await scalar(h, "SELECT count(*) FROM journal_entries") == 0
    # Not a final outcome: the same key may be retried (and times out again).
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await buy(h, space, "bob", card=TestCards.TIMEOUT, key=key)
    assert error_reason(again.value) == "PROCESSOR_UNAVAILABLE"
    assert (await books(h)).balanced


async def test_a_lost_answer_is_reconciled_not_guessed(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h, capacity=2)
    ticket = await buy(h, space, "bob", card=TestCards.TIMEOUT_AFTER_CHARGE)
    # The processor authorized before its answer was lost; looking the charge up by its
    # idempotency key found it, so the buyer has a ticket and was charged exactly once.
    assert ticket.state == res.Ticket.STATE_PAID
    assert await scalar(h, "SELECT count(*) FROM sandbox_charges") == 1
    assert await scalar(h, "SELECT status FROM sandbox_charges") == "captured"
    report = await books(h)
    assert report.balanced and report.processor_gap == {}, report
