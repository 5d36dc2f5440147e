"""Payments' pure rules: integer fee split, balanced journal entries, sale state, names,
page tokens and the sandbox's test cards."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.auth import Principal
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from services.payments import domain
from services.payments.domain import (
    EntryKind,
    FeeSplit,
    JournalEntry,
    Offering,
    OfferingState,
    Posting,
    SpaceFacts,
    SpaceState,
)
from services.payments.processor import TestCards, _Behaviour, _behaviour

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def offering(**changes: object) -> Offering:
    values: dict[str, object] = dict(
        space_id="s1",
        host_id="host",
        price_minor=1500,
        currency_code="USD",
        capacity=10,
        sold_count=0,
        reserved_count=0,
        sales_end_time=None,
        state=OfferingState.ON_SALE,
        create_time=NOW,
        update_time=NOW,
    )
    values.update(changes)
    return Offering(**values)  # type: ignore[arg-type]


def space(state: SpaceState = SpaceState.SCHEDULED, hours: int = 2) -> SpaceFacts:
    return SpaceFacts("s1", "host", state, NOW + dt.timedelta(hours=hours))


# -- fees -------------------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=10**12), st.integers(min_value=0, max_value=10_000))
def test_fee_split_is_exact_and_rounds_half_up(gross: int, bps: int) -> None:
    split = domain.fee_split(gross, bps)
    assert split.fee + split.net == gross
    assert split.fee >= 0 and split.net >= 0
    # Half up: the fee is the nearest integer to gross*bps/10000, ties going up.
    exact_times_2 = 2 * gross * bps
    assert 2 * 10_000 * split.fee - 10_000 <= exact_times_2 < 2 * 10_000 * split.fee + 10_000


@pytest.mark.parametrize(
    ("gross", "bps", "fee"),
    [
        (1999, 1000, 200),
        (1995, 1000, 200),
        (1994, 1000, 199),
        (333, 1000, 33),
        (5, 1000, 1),
        (4, 1000, 0),
        (100, 0, 0),
        (100, 10_000, 100),
    ],
)
def test_fee_examples(gross: int, bps: int, fee: int) -> None:
    assert domain.fee_split(gross, bps) == FeeSplit(gross, fee, gross - fee)


def test_fee_split_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        domain.fee_split(0, 1000)
    with pytest.raises(ValueError):
        domain.fee_split(100, 10_001)


# -- journal entries --------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=10**9), st.integers(min_value=0, max_value=10_000))
def test_every_builder_balances(gross: int, bps: int) -> None:
    split = domain.fee_split(gross, bps)
    entries = [
        domain.sale_entry("spaces/s/tickets/t", "t", "host", split, "USD"),
        domain.refund_entry("spaces/s/tickets/t", "t", "host", split, "USD", settled=False),
        domain.refund_entry("spaces/s/tickets/t", "t", "host", split, "USD", settled=True),
        domain.tip_entry("spaces/s/tips/p", "p", "carol", split, "USD"),
        domain.settlement_entry("s", "host", gross, "USD"),
        domain.payout_requested_entry("users/h/payouts/p", "p", "h", gross, "USD"),
        domain.payout_paid_entry("users/h/payouts/p", "p", "h", gross, "USD"),
        domain.payout_failed_entry("users/h/payouts/p", "p", "h", gross, "USD"),
    ]
    for entry in entries:
        assert sum(p.amount_minor for p in entry.postings) == 0
        assert len(entry.postings) >= 2


def test_a_sale_and_its_refund_cancel_out() -> None:
    split = domain.fee_split(2500, 1000)
    sale = domain.sale_entry("spaces/s/tickets/t", "t", "host", split, "USD")
    refund = domain.refund_entry("spaces/s/tickets/t", "t", "host", split, "USD", settled=False)
    totals: dict[str, int] = {}
    for posting in (*sale.postings, *refund.postings):
        totals[posting.account] = totals.get(posting.account, 0) + posting.amount_minor
    assert set(totals.values()) == {0}
    assert sale.dedupe_key == "sale:t" and refund.dedupe_key == "refund:t"
    settled = domain.refund_entry("spaces/s/tickets/t", "t", "host", split, "USD", settled=True)
    assert ("users/host/accounts/available", -2250) in {
        (p.account, p.amount_minor) for p in settled.postings
    }


def test_an_unbalanced_entry_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="do not balance"):
        JournalEntry(
            EntryKind.TIP,
            "x",
            "x",
            "x",
            (Posting("a", 100, "USD"), Posting("b", -99, "USD")),
        )
    with pytest.raises(ValueError, match="balance"):
        JournalEntry(
            EntryKind.TIP,
            "x",
            "x",
            "x",
            (Posting("a", 100, "USD"), Posting("b", -100, "EUR")),
        )
    with pytest.raises(ValueError, match="two"):
        JournalEntry(EntryKind.TIP, "x", "x", "x", (Posting("a", 0, "USD"),))


# -- sales ------------------------------------------------------------------------------


def test_purchase_refusals_in_contract_order() -> None:
    with pytest.raises(NotFound) as missing:
        domain.check_purchase(None, space(), "bob", 1500, "USD", NOW)
    assert missing.value.reason == "TICKET_OFFERING_NOT_FOUND"
    with pytest.raises(FailedPrecondition) as host:
        domain.check_purchase(offering(), space(), "host", 1500, "USD", NOW)
    assert host.value.reason == "HOST_CANNOT_BUY"
    with pytest.raises(FailedPrecondition) as started:
        domain.check_purchase(offering(), space(SpaceState.LIVE), "bob", 1500, "USD", NOW)
    assert started.value.reason == "SALES_CLOSED"
    with pytest.raises(FailedPrecondition) as past:
        domain.check_purchase(offering(), space(hours=-1), "bob", 1500, "USD", NOW)
    assert past.value.reason == "SALES_CLOSED"
    with pytest.raises(FailedPrecondition) as price:
        domain.check_purchase(offering(), space(), "bob", 1400, "USD", NOW)
    assert price.value.reason == "PRICE_CHANGED"
    with pytest.raises(ResourceExhausted) as full:
        domain.check_purchase(
            offering(sold_count=9, reserved_count=1), space(), "bob", 1500, "USD", NOW
        )
    assert full.value.reason == "SOLD_OUT"
    assert domain.check_purchase(offering(), space(), "bob", 1500, "USD", NOW).space_id == "s1"


def test_sales_end_defaults_to_the_start_and_an_own_end_wins() -> None:
    assert domain.sales_end(offering(), space()) == NOW + dt.timedelta(hours=2)
    early = NOW + dt.timedelta(minutes=30)
    assert domain.sales_end(offering(sales_end_time=early), space()) == early
    closed = domain.effective_state(offering(sales_end_time=early), space(), early)
    assert closed is OfferingState.SALES_CLOSED
    assert domain.effective_state(offering(state=OfferingState.CANCELED), space(), NOW) is (
        OfferingState.CANCELED
    )


def test_offering_updates() -> None:
    sold = offering(sold_count=4, reserved_count=1)
    with pytest.raises(FailedPrecondition) as below:
        domain.check_offering_update(
            sold, space(), ["capacity"], capacity=4, price_minor=0, currency_code="", now=NOW
        )
    assert below.value.reason == "CAPACITY_BELOW_SOLD"
    with pytest.raises(FailedPrecondition) as locked:
        domain.check_offering_update(
            sold, space(), ["price"], capacity=0, price_minor=900, currency_code="USD", now=NOW
        )
    assert locked.value.reason == "PRICE_LOCKED"
    domain.check_offering_update(
        offering(), space(), ["price"], capacity=0, price_minor=900, currency_code="USD", now=NOW
    )


def test_space_states_only_move_forward() -> None:
    assert domain.advances(None, SpaceState.SCHEDULED)
    assert domain.advances(SpaceState.SCHEDULED, SpaceState.LIVE)
    assert not domain.advances(SpaceState.LIVE, SpaceState.SCHEDULED)
    assert not domain.advances(SpaceState.ENDED, SpaceState.CANCELED)
    assert not domain.advances(SpaceState.CANCELED, SpaceState.LIVE)


# -- who may ----------------------------------------------------------------------------


def test_owners_and_services() -> None:
    bob = Principal.user("bob")
    rooms = Principal.service("rooms")
    assert domain.resolve_owner("me", bob) == "bob"
    assert domain.resolve_owner("bob", bob) == "bob"
    with pytest.raises(PermissionDenied) as other:
        domain.resolve_owner("alice", bob)
    assert other.value.reason == "NOT_OWNER"
    assert domain.resolve_owner("alice", rooms) == "alice"
    with pytest.raises(InvalidArgument):
        domain.resolve_owner("me", rooms)
    with pytest.raises(PermissionDenied):
        domain.require_owner_user("alice", rooms)
    with pytest.raises(PermissionDenied) as not_host:
        domain.require_host(space(), bob)
    assert not_host.value.reason == "NOT_HOST"
    domain.require_host(space(), Principal.user("host"))


# -- names, tokens, fingerprints --------------------------------------------------------


def test_names_round_trip() -> None:
    assert domain.parse_ticket(domain.ticket_name("s1", "t1")) == ("s1", "t1")
    assert domain.parse_offering(domain.offering_name("s1")) == "s1"
    assert domain.parse_payout(domain.payout_name("u", "p")) == ("u", "p")
    assert domain.parse_balance("users/me/balance") == "me"
    with pytest.raises(InvalidArgument):
        domain.parse_space("spaces/Bad")


def test_page_tokens() -> None:
    token = domain.encode_page_token("tickets", "spaces/s1", "01abc")
    assert domain.decode_page_token(token, "tickets", "spaces/s1") == "01abc"
    assert domain.decode_page_token("", "tickets", "spaces/s1") is None
    for bad in ("!!", "bm9wZQ", domain.encode_page_token("payouts", "spaces/s1", "x")):
        with pytest.raises(InvalidArgument):
            domain.decode_page_token(bad, "tickets", "spaces/s1")
    assert domain.page_size(0) == 20 and domain.page_size(500) == 100


def test_fingerprints_tell_requests_apart() -> None:
    a = domain.fingerprint("purchase", "s1", "4242424242424242", 1500, "USD")
    assert a == domain.fingerprint("purchase", "s1", "4242424242424242", 1500, "USD")
    assert a != domain.fingerprint("purchase", "s1", "4242424242424242", 1501, "USD")
    assert a != domain.fingerprint("purchase", "s1", "42424242424242421", 500, "USD")
    assert b"4242" not in a


# -- the sandbox's test cards -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "behaviour"),
    [
        (TestCards.SUCCESS, _Behaviour.SUCCEED),
        (TestCards.DECLINED, _Behaviour.DECLINE),
        (TestCards.INSUFFICIENT_FUNDS, _Behaviour.INSUFFICIENT),
        (TestCards.TIMEOUT, _Behaviour.TIMEOUT),
        (TestCards.TIMEOUT_AFTER_CHARGE, _Behaviour.TIMEOUT_AFTER_CHARGE),
        ("5555555555554444", _Behaviour.SUCCEED),
        ("4242424242424241", _Behaviour.INCORRECT_NUMBER),
        ("tok_visa", _Behaviour.SUCCEED),
        ("tok_chargeDeclinedInsufficientFunds", _Behaviour.INSUFFICIENT),
        ("tok_unknown", _Behaviour.INVALID_TOKEN),
    ],
)
def test_sandbox_test_cards(method: str, behaviour: _Behaviour) -> None:
    assert _behaviour(method)[0] is behaviour


def test_tip_range() -> None:
    domain.check_tip_amount(100, 100, 500)
    domain.check_tip_amount(500, 100, 500)
    for amount in (99, 501):
        with pytest.raises(InvalidArgument) as error:
            domain.check_tip_amount(amount, 100, 500)
        assert error.value.reason == "TIP_AMOUNT_OUT_OF_RANGE"
