"""Records to protos: the resources payments returns and the events it publishes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from google.protobuf import timestamp_pb2
from spaces.common.v1 import money_pb2
from spaces.payments.v1 import payments_events_pb2 as events_pb
from spaces.payments.v1 import payments_resources_pb2 as pb

from services.payments import domain
from services.payments.domain import Offering, OfferingState, SpaceFacts
from services.payments.store import EntryRecord, Event, PayoutRecord, TicketRecord, TipRecord

logger = logging.getLogger(__name__)

_OFFERING_STATES = {
    OfferingState.ON_SALE: pb.TicketOffering.STATE_ON_SALE,
    OfferingState.SALES_CLOSED: pb.TicketOffering.STATE_SALES_CLOSED,
    OfferingState.CANCELED: pb.TicketOffering.STATE_CANCELED,
    OfferingState.SETTLED: pb.TicketOffering.STATE_SETTLED,
}
_TICKET_STATES = {
    "paid": pb.Ticket.STATE_PAID,
    "refund_pending": pb.Ticket.STATE_REFUND_PENDING,
    "refunded": pb.Ticket.STATE_REFUNDED,
}
TICKET_STATE_NAMES = {value: key for key, value in _TICKET_STATES.items()}
_REFUND_REASONS = {
    "host": pb.REFUND_REASON_HOST,
    "space_canceled": pb.REFUND_REASON_SPACE_CANCELED,
    "system": pb.REFUND_REASON_SYSTEM,
}
_PAYOUT_STATES = {
    "pending": pb.Payout.STATE_PENDING,
    "paid": pb.Payout.STATE_PAID,
    "failed": pb.Payout.STATE_FAILED,
}


def timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    """A protobuf timestamp for an aware datetime."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def money(amount_minor: int, currency_code: str) -> money_pb2.Money:
    return money_pb2.Money(amount_minor=amount_minor, currency_code=currency_code)


def offering_pb(
    offering: Offering, space: SpaceFacts | None, now: dt.datetime
) -> pb.TicketOffering:
    """The offering as clients see it: its effective state and effective sales end."""
    message = pb.TicketOffering(
        name=domain.offering_name(offering.space_id),
        price=money(offering.price_minor, offering.currency_code),
        capacity=offering.capacity,
        sold_count=offering.sold_count,
        state=_OFFERING_STATES[domain.effective_state(offering, space, now)],
        host=domain.user_name(offering.host_id),
        create_time=timestamp(offering.create_time),
        update_time=timestamp(offering.update_time),
    )
    end = domain.sales_end(offering, space)
    if end is not None:
        message.sales_end_time.CopyFrom(timestamp(end))
    return message


def ticket_pb(ticket: TicketRecord) -> pb.Ticket:
    # A reserved seat is reported as paid only by the purchase that confirms it.
    message = pb.Ticket(
        name=domain.ticket_name(ticket.space_id, ticket.id),
        owner=domain.user_name(ticket.owner_id),
        price=money(ticket.price_minor, ticket.currency_code),
        state=_TICKET_STATES.get(ticket.state, pb.Ticket.STATE_PAID),
        refund_reason=_REFUND_REASONS.get(ticket.refund_reason or "", 0),  # type: ignore[arg-type]
        create_time=timestamp(ticket.create_time),
    )
    if ticket.refund_time is not None and ticket.state == "refunded":
        message.refund_time.CopyFrom(timestamp(ticket.refund_time))
    return message


def tip_pb(tip: TipRecord) -> pb.Tip:
    return pb.Tip(
        name=domain.tip_name(tip.space_id, tip.id),
        sender=domain.user_name(tip.sender_id),
        recipient=domain.user_name(tip.recipient_id),
        amount=money(tip.amount_minor, tip.currency_code),
        message=tip.message,
        create_time=timestamp(tip.create_time),
    )


def payout_pb(payout: PayoutRecord) -> pb.Payout:
    message = pb.Payout(
        name=domain.payout_name(payout.user_id, payout.id),
        amount=money(payout.amount_minor, payout.currency_code),
        state=_PAYOUT_STATES[payout.state],
        failure_reason=payout.failure_reason,
        create_time=timestamp(payout.create_time),
    )
    if payout.complete_time is not None:
        message.complete_time.CopyFrom(timestamp(payout.complete_time))
    return message


def entry_pb(user_id: str, entry: EntryRecord) -> pb.LedgerEntry:
    return pb.LedgerEntry(
        name=domain.ledger_entry_name(user_id, entry.id),
        kind=pb.LedgerEntryKind.Value(entry.kind),
        subject=entry.subject,
        description=entry.description,
        postings=[
            pb.Posting(
                account=p.account, amount_minor=p.amount_minor, currency_code=p.currency_code
            )
            for p in entry.postings
        ],
        create_time=timestamp(entry.create_time),
    )


def balance_pb(user_id: str, balances: dict[str, dict[str, int]]) -> pb.Balance:
    """One CurrencyBalance per currency the user ever had postings in, by currency code."""
    message = pb.Balance(name=f"users/{user_id}/balance")
    for currency in sorted(balances):
        accounts = balances[currency]
        message.balances.append(
            pb.CurrencyBalance(
                currency_code=currency,
                available=money(accounts.get("available", 0), currency),
                held=money(accounts.get("held", 0), currency),
                payout_pending=money(accounts.get("payoutPending", 0), currency),
                paid_out=money(accounts.get("paidOut", 0), currency),
            )
        )
    return message


# -- events ------------------------------------------------------------------------------


def ticket_purchased(ticket: TicketRecord, sold_count: int, now: dt.datetime) -> Event:
    paid = dataclasses.replace(ticket, state="paid")
    return Event(
        "ticket.purchased",
        domain.ticket_name(ticket.space_id, ticket.id),
        events_pb.TicketPurchasedEvent(
            ticket=ticket_pb(paid),
            host_id=ticket.host_id,
            sold_count=sold_count,
            event_time=timestamp(now),
        ),
    )


def ticket_refunded(ticket: TicketRecord, now: dt.datetime) -> Event:
    return Event(
        "ticket.refunded",
        domain.ticket_name(ticket.space_id, ticket.id),
        events_pb.TicketRefundedEvent(
            ticket=ticket_pb(ticket),
            host_id=ticket.host_id,
            note=ticket.refund_note,
            event_time=timestamp(now),
        ),
    )


def tip_sent(tip: TipRecord, now: dt.datetime) -> Event:
    return Event(
        "tip.sent",
        domain.tip_name(tip.space_id, tip.id),
        events_pb.TipSentEvent(tip=tip_pb(tip), event_time=timestamp(now)),
    )


def payout_completed(payout: PayoutRecord, now: dt.datetime) -> Event:
    if payout.state == "paid":
        return Event(
            "payout.paid",
            domain.payout_name(payout.user_id, payout.id),
            events_pb.PayoutPaidEvent(payout=payout_pb(payout), event_time=timestamp(now)),
        )
    return Event(
        "payout.failed",
        domain.payout_name(payout.user_id, payout.id),
        events_pb.PayoutFailedEvent(payout=payout_pb(payout), event_time=timestamp(now)),
    )
