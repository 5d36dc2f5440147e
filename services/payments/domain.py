"""Payments' rules, free of I/O: money and fees, the accounts and journal entries of the
double-entry ledger, resource names, who may do what, ticket-sale state, page tokens and
request fingerprints.

Rules raise :class:`~services.common.errors.ServiceError` subclasses carrying the reasons
the proto documents, so the servicer only decodes requests and encodes responses.

Ledger sign convention: an account's balance is the sum of its postings. Accounts that
hold money owed to someone (a user's held/available/payoutPending/paidOut, the platform's
fees) grow with positive postings; ``processor/accounts/clearing`` is their counterpart
and goes negative as money comes in through the processor. Every entry sums to zero per
currency, so the whole ledger does too.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import enum
import hashlib
import logging
import re
from collections.abc import Sequence

from services.common.auth import Principal
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CLEARING_ACCOUNT",
    "FEES_ACCOUNT",
    "ME",
    "EntryKind",
    "FeeSplit",
    "JournalEntry",
    "Offering",
    "OfferingState",
    "Posting",
    "SpaceFacts",
    "SpaceState",
    "account",
    "check_purchase",
    "fee_split",
    "fingerprint",
    "payout_failed_entry",
    "payout_paid_entry",
    "payout_requested_entry",
    "sale_entry",
    "settlement_entry",
    "tip_entry",
    "refund_entry",
]

ME = "me"
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
DEFAULT_REFUND_BATCH = 100

FEES_ACCOUNT = "platform/accounts/fees"
CLEARING_ACCOUNT = "processor/accounts/clearing"

_ID = r"[a-z0-9][a-z0-9-]{0,62}"
_SPACE = re.compile(rf"^spaces/({_ID})$")
_OFFERING = re.compile(rf"^spaces/({_ID})/ticketOffering$")
_TICKET = re.compile(rf"^spaces/({_ID})/tickets/({_ID})$")
_USER = re.compile(rf"^users/({_ID})$")
_BALANCE = re.compile(rf"^users/({_ID})/balance$")
_PAYOUT = re.compile(rf"^users/({_ID})/payouts/({_ID})$")
_TOKEN_ALPHABET = re.compile(r"^[A-Za-z0-9_-]*$")


# -- money -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeeSplit:
    """How a payment divides between the payee and the platform.

    :ivar gross: what the payer paid.
    :ivar fee: the platform's part.
    :ivar net: the payee's part, ``gross - fee``.
    """

    gross: int
    fee: int
    net: int


def fee_split(gross_minor: int, fee_bps: int) -> FeeSplit:
    """Split ``gross_minor`` into platform fee and payee net, in integers only.

    Rounding rule: the fee is ``gross * bps / 10000`` rounded half up to a whole minor
    unit (``(gross * bps + 5000) // 10000``); the payee gets the rest, so fee + net is
    always exactly the gross and no fraction of a minor unit is ever created or lost.

    :param gross_minor: amount paid, in minor units (> 0).
    :param fee_bps: fee in basis points, 0 to 10000.
    """
    if gross_minor <= 0:
        raise ValueError("amounts are positive")
    if not 0 <= fee_bps <= 10_000:
        raise ValueError("fee_bps is 0 to 10000")
    fee = (gross_minor * fee_bps + 5_000) // 10_000
    return FeeSplit(gross=gross_minor, fee=fee, net=gross_minor - fee)


# -- ledger ------------------------------------------------------------------------------


class EntryKind(enum.StrEnum):
    """What a journal entry records; values are the proto enum's names."""

    TICKET_SALE = "LEDGER_ENTRY_KIND_TICKET_SALE"
    TICKET_REFUND = "LEDGER_ENTRY_KIND_TICKET_REFUND"
    TIP = "LEDGER_ENTRY_KIND_TIP"
    SETTLEMENT = "LEDGER_ENTRY_KIND_SETTLEMENT"
    PAYOUT_REQUESTED = "LEDGER_ENTRY_KIND_PAYOUT_REQUESTED"
    PAYOUT_PAID = "LEDGER_ENTRY_KIND_PAYOUT_PAID"
    PAYOUT_FAILED = "LEDGER_ENTRY_KIND_PAYOUT_FAILED"


class UserAccount(enum.StrEnum):
    """The accounts every user has, per currency."""

    HELD = "held"
    AVAILABLE = "available"
    PAYOUT_PENDING = "payoutPending"
    PAID_OUT = "paidOut"


def account(user_id: str, which: UserAccount) -> str:
    """``users/{user}/accounts/{which}``."""
    return f"users/{user_id}/accounts/{which.value}"


@dataclasses.dataclass(frozen=True)
class Posting:
    """One line of a journal entry.

    :ivar account: the account name.
    :ivar amount_minor: signed amount.
    :ivar currency_code: ISO 4217 code.
    :ivar user_id: the owner of a user account; ``None`` for system accounts.
    """

    account: str
    amount_minor: int
    currency_code: str
    user_id: str | None = None


def _user_posting(user_id: str, which: UserAccount, amount: int, currency: str) -> Posting:
    return Posting(account(user_id, which), amount, currency, user_id)


@dataclasses.dataclass(frozen=True)
class JournalEntry:
    """A balanced journal entry, ready to book.

    :ivar kind: what it records.
    :ivar subject: resource it is about (ticket, tip, Space or payout name).
    :ivar description: human-readable summary.
    :ivar dedupe_key: the business fact it books; the store refuses a second entry with it.
    :ivar postings: at least two lines, summing to zero per currency.
    :raises ValueError: on construction, when the entry does not balance.
    """

    kind: EntryKind
    subject: str
    description: str
    dedupe_key: str
    postings: tuple[Posting, ...]

    def __post_init__(self) -> None:
        lines = [p for p in self.postings if p.amount_minor != 0]
        if len(lines) < 2:
            raise ValueError(f"{self.dedupe_key}: an entry needs two non-zero postings")
        totals: dict[str, int] = {}
        for posting in lines:
            totals[posting.currency_code] = totals.get(posting.currency_code, 0) + (
                posting.amount_minor
            )
        if any(total != 0 for total in totals.values()):
            raise ValueError(f"{self.dedupe_key}: postings do not balance: {totals}")
        object.__setattr__(self, "postings", tuple(lines))


def _payment_postings(payee_id: str, split: FeeSplit, currency: str) -> tuple[Posting, ...]:
    return (
        Posting(CLEARING_ACCOUNT, -split.gross, currency),
        _user_posting(payee_id, UserAccount.HELD, split.net, currency),
        Posting(FEES_ACCOUNT, split.fee, currency),
    )


def sale_entry(
    ticket: str, ticket_id: str, host_id: str, split: FeeSplit, currency: str
) -> JournalEntry:
    """Processor clearing to the host's held account and the platform fee."""
    return JournalEntry(
        EntryKind.TICKET_SALE,
        ticket,
        f"Ticket sold: {ticket}",
        f"sale:{ticket_id}",
        _payment_postings(host_id, split, currency),
    )


def refund_entry(
    ticket: str,
    ticket_id: str,
    host_id: str,
    split: FeeSplit,
    currency: str,
    *,
    settled: bool,
) -> JournalEntry:
    """The reverse of a sale: from held, or from available once the Space was settled.

    The platform gives its fee back too: the buyer gets the full price.
    """
    source = UserAccount.AVAILABLE if settled else UserAccount.HELD
    return JournalEntry(
        EntryKind.TICKET_REFUND,
        ticket,
        f"Ticket refunded: {ticket}",
        f"refund:{ticket_id}",
        (
            _user_posting(host_id, source, -split.net, currency),
            Posting(FEES_ACCOUNT, -split.fee, currency),
            Posting(CLEARING_ACCOUNT, split.gross, currency),
        ),
    )


def tip_entry(
    tip: str, tip_id: str, recipient_id: str, split: FeeSplit, currency: str
) -> JournalEntry:
    """Processor clearing to the recipient's held account and the platform fee."""
    return JournalEntry(
        EntryKind.TIP,
        tip,
        f"Tip received: {tip}",
        f"tip:{tip_id}",
        _payment_postings(recipient_id, split, currency),
    )


def settlement_entry(
    space_id: str, payee_id: str, amount_minor: int, currency: str
) -> JournalEntry:
    """A Space's revenue for one payee in one currency: held to available."""
    return JournalEntry(
        EntryKind.SETTLEMENT,
        f"spaces/{space_id}",
        f"Revenue of spaces/{space_id} released",
        f"settle:{space_id}:{payee_id}:{currency}",
        (
            _user_posting(payee_id, UserAccount.HELD, -amount_minor, currency),
            _user_posting(payee_id, UserAccount.AVAILABLE, amount_minor, currency),
        ),
    )


def payout_requested_entry(
    payout: str, payout_id: str, user_id: str, amount: int, currency: str
) -> JournalEntry:
    """Available to payout pending (the amount is reserved at once)."""
    return JournalEntry(
        EntryKind.PAYOUT_REQUESTED,
        payout,
        f"Payout requested: {payout}",
        f"payout-requested:{payout_id}",
        (
            _user_posting(user_id, UserAccount.AVAILABLE, -amount, currency),
            _user_posting(user_id, UserAccount.PAYOUT_PENDING, amount, currency),
        ),
    )


def payout_paid_entry(
    payout: str, payout_id: str, user_id: str, amount: int, currency: str
) -> JournalEntry:
    """Payout pending to paid out: the money left through the processor.

    ``paidOut`` is the user's running total of money sent out; the processor's clearing
    account is not touched again because a payout's money is the same money that came in
    (clearing keeps what came in, the user accounts say where it went).
    """
    return JournalEntry(
        EntryKind.PAYOUT_PAID,
        payout,
        f"Payout paid: {payout}",
        f"payout-done:{payout_id}",
        (
            _user_posting(user_id, UserAccount.PAYOUT_PENDING, -amount, currency),
            _user_posting(user_id, UserAccount.PAID_OUT, amount, currency),
        ),
    )


def payout_failed_entry(
    payout: str, payout_id: str, user_id: str, amount: int, currency: str
) -> JournalEntry:
    """Payout pending back to available."""
    return JournalEntry(
        EntryKind.PAYOUT_FAILED,
        payout,
        f"Payout failed: {payout}",
        f"payout-done:{payout_id}",
        (
            _user_posting(user_id, UserAccount.PAYOUT_PENDING, -amount, currency),
            _user_posting(user_id, UserAccount.AVAILABLE, amount, currency),
        ),
    )


# -- names -------------------------------------------------------------------------------


def _match(pattern: re.Pattern[str], name: str, field: str, what: str) -> re.Match[str]:
    match = pattern.match(name)
    if match is None:
        raise InvalidArgument(
            f"{field} must be {what}", field_violations=[(field, f"must be {what}")]
        )
    return match


def parse_space(name: str, field: str = "parent") -> str:
    """The id in ``spaces/{space}``."""
    return _match(_SPACE, name, field, "spaces/{space}").group(1)


def parse_offering(name: str, field: str = "name") -> str:
    """The Space id in ``spaces/{space}/ticketOffering``."""
    return _match(_OFFERING, name, field, "spaces/{space}/ticketOffering").group(1)


def parse_ticket(name: str, field: str = "name") -> tuple[str, str]:
    """``(space id, ticket id)`` of ``spaces/{space}/tickets/{ticket}``."""
    match = _match(_TICKET, name, field, "spaces/{space}/tickets/{ticket}")
    return match.group(1), match.group(2)


def parse_user(name: str, field: str = "parent") -> str:
    """The id (or ``me``) in ``users/{user}``."""
    return _match(_USER, name, field, "users/{user}").group(1)


def parse_balance(name: str) -> str:
    """The id (or ``me``) in ``users/{user}/balance``."""
    return _match(_BALANCE, name, "name", "users/{user}/balance").group(1)


def parse_payout(name: str) -> tuple[str, str]:
    """``(user id or me, payout id)`` of ``users/{user}/payouts/{payout}``."""
    match = _match(_PAYOUT, name, "name", "users/{user}/payouts/{payout}")
    return match.group(1), match.group(2)


def space_name(space_id: str) -> str:
    return f"spaces/{space_id}"


def offering_name(space_id: str) -> str:
    return f"spaces/{space_id}/ticketOffering"


def ticket_name(space_id: str, ticket_id: str) -> str:
    return f"spaces/{space_id}/tickets/{ticket_id}"


def tip_name(space_id: str, tip_id: str) -> str:
    return f"spaces/{space_id}/tips/{tip_id}"


def user_name(user_id: str) -> str:
    return f"users/{user_id}"


def payout_name(user_id: str, payout_id: str) -> str:
    return f"users/{user_id}/payouts/{payout_id}"


def ledger_entry_name(user_id: str, entry_id: str) -> str:
    return f"users/{user_id}/ledgerEntries/{entry_id}"


# -- who may do what ---------------------------------------------------------------------


def caller_user_id(principal: Principal) -> str:
    """The calling user's id.

    :raises PermissionDenied: ``USER_REQUIRED`` when a service calls a per-user action.
    """
    if not principal.is_user or principal.user_id is None:
        raise PermissionDenied("this action is for signed-in users", reason="USER_REQUIRED")
    return principal.user_id


def resolve_owner(segment: str, principal: Principal) -> str:
    """The user a ``users/{user}`` name denotes, checked against the caller.

    Users see only their own money; Spaces services may read anyone's (support tools).

    :raises PermissionDenied: ``NOT_OWNER`` when a user names someone else.
    """
    if principal.is_service:
        if segment == ME:
            raise InvalidArgument("services must name the user by id", reason="USER_ID_REQUIRED")
        return segment
    user_id = caller_user_id(principal)
    if segment not in (ME, user_id):
        raise PermissionDenied("that is another user's money", reason="NOT_OWNER")
    return user_id


def require_owner_user(segment: str, principal: Principal) -> str:
    """Like :func:`resolve_owner` but for writes: only the user themselves."""
    if principal.is_service:
        raise PermissionDenied("only the user may move their money", reason="NOT_OWNER")
    return resolve_owner(segment, principal)


def require_host(facts: SpaceFacts, principal: Principal) -> None:
    """:raises PermissionDenied: ``NOT_HOST`` unless the caller hosts the Space."""
    if not principal.is_user or principal.user_id != facts.host_id:
        raise PermissionDenied("only the Space's host may do this", reason="NOT_HOST")


# -- Spaces and offerings ------------------------------------------------------------------


class SpaceState(enum.StrEnum):
    """A Space's lifecycle as the projection knows it; it only moves forward."""

    SCHEDULED = "scheduled"
    LIVE = "live"
    ENDED = "ended"
    CANCELED = "canceled"

    @property
    def rank(self) -> int:
        return _SPACE_RANK[self]


_SPACE_RANK = {
    SpaceState.SCHEDULED: 0,
    SpaceState.LIVE: 1,
    SpaceState.ENDED: 2,
    SpaceState.CANCELED: 2,
}


def advances(current: SpaceState | None, new: SpaceState) -> bool:
    """Whether an event moving a Space to ``new`` applies (events may come out of order)."""
    return current is None or new.rank > current.rank


@dataclasses.dataclass(frozen=True)
class SpaceFacts:
    """What the projection knows of a Space."""

    id: str
    host_id: str
    state: SpaceState
    scheduled_start_time: dt.datetime | None


class OfferingState(enum.StrEnum):
    """Stored offering states; SALES_CLOSED is also derived (see :func:`effective_state`)."""

    ON_SALE = "on_sale"
    SALES_CLOSED = "sales_closed"
    CANCELED = "canceled"
    SETTLED = "settled"


@dataclasses.dataclass(frozen=True)
class Offering:
    """A ticket offering as stored."""

    space_id: str
    host_id: str
    price_minor: int
    currency_code: str
    capacity: int
    sold_count: int
    reserved_count: int
    sales_end_time: dt.datetime | None
    state: OfferingState
    create_time: dt.datetime
    update_time: dt.datetime


def sales_end(offering: Offering, space: SpaceFacts | None) -> dt.datetime | None:
    """When sales stop: the offering's own end, else the Space's scheduled start."""
    if offering.sales_end_time is not None:
        return offering.sales_end_time
    return space.scheduled_start_time if space is not None else None


def effective_state(
    offering: Offering, space: SpaceFacts | None, now: dt.datetime
) -> OfferingState:
    """The state to show: an on-sale offering whose sales ended or whose Space started is closed."""
    if offering.state is not OfferingState.ON_SALE:
        return offering.state
    if space is not None and space.state is not SpaceState.SCHEDULED:
        return OfferingState.SALES_CLOSED
    end = sales_end(offering, space)
    if end is not None and now >= end:
        return OfferingState.SALES_CLOSED
    return OfferingState.ON_SALE


def offering_not_found() -> NotFound:
    return NotFound("the Space is not ticketed", reason="TICKET_OFFERING_NOT_FOUND")


def check_purchase(
    offering: Offering | None,
    space: SpaceFacts | None,
    buyer_id: str,
    price_minor: int,
    currency_code: str,
    now: dt.datetime,
) -> Offering:
    """Refuse a purchase that cannot succeed, in the order the contract lists the reasons.

    Capacity is checked here only as a fast path; the store's conditional reservation is
    what guarantees it under concurrency.
    """
    if offering is None:
        raise offering_not_found()
    if buyer_id == offering.host_id:
        raise FailedPrecondition("hosts cannot buy their own tickets", reason="HOST_CANNOT_BUY")
    state = effective_state(offering, space, now)
    if state is not OfferingState.ON_SALE:
        raise sales_closed()
    if price_minor != offering.price_minor or currency_code != offering.currency_code:
        raise FailedPrecondition(
            "the price changed; show the new price and ask again",
            reason="PRICE_CHANGED",
            metadata={
                "price_minor": str(offering.price_minor),
                "currency_code": offering.currency_code,
            },
        )
    if offering.sold_count + offering.reserved_count >= offering.capacity:
        raise sold_out()
    return offering


def sold_out() -> ResourceExhausted:
    return ResourceExhausted(
        "every ticket is sold",
        reason="SOLD_OUT",
        quota_subject="space",
        quota_description="ticket capacity",
    )


def sales_closed() -> FailedPrecondition:
    return FailedPrecondition("ticket sales are closed", reason="SALES_CLOSED")


def already_owned() -> AlreadyExists:
    return AlreadyExists("you already hold a ticket for this Space", reason="TICKET_ALREADY_OWNED")


def check_offering_update(
    offering: Offering,
    space: SpaceFacts | None,
    paths: Sequence[str],
    *,
    capacity: int,
    price_minor: int,
    currency_code: str,
    now: dt.datetime,
) -> None:
    """Refuse an update the contract forbids."""
    if effective_state(offering, space, now) is not OfferingState.ON_SALE:
        raise sales_closed()
    if "capacity" in paths and capacity < offering.sold_count + offering.reserved_count:
        raise FailedPrecondition(
            f"capacity cannot go below the {offering.sold_count} tickets sold",
            reason="CAPACITY_BELOW_SOLD",
        )
    if "price" in paths and (
        price_minor != offering.price_minor or currency_code != offering.currency_code
    ):
        if offering.sold_count + offering.reserved_count > 0:
            raise FailedPrecondition(
                "the price cannot change once a ticket was sold", reason="PRICE_LOCKED"
            )


def check_currency(currency_code: str, supported: frozenset[str], field: str) -> None:
    """:raises InvalidArgument: ``UNSUPPORTED_CURRENCY``."""
    if currency_code not in supported:
        raise InvalidArgument(
            f"the processor does not take {currency_code}",
            reason="UNSUPPORTED_CURRENCY",
            field_violations=[(field, "currency not supported")],
        )


def check_tip_amount(amount_minor: int, minimum: int, maximum: int) -> None:
    """:raises InvalidArgument: ``TIP_AMOUNT_OUT_OF_RANGE`` outside the configured range."""
    if not minimum <= amount_minor <= maximum:
        raise InvalidArgument(
            f"tips are {minimum} to {maximum} minor units",
            reason="TIP_AMOUNT_OUT_OF_RANGE",
            field_violations=[("amount.amount_minor", f"must be {minimum} to {maximum}")],
        )


# -- idempotency -------------------------------------------------------------------------


def fingerprint(operation: str, *parts: str | int) -> bytes:
    """A digest of what a request asks for, to tell a true repeat from a reused key.

    Card numbers go in only as part of this one-way digest; they are never stored.
    """
    digest = hashlib.sha256(operation.encode())
    for part in parts:
        digest.update(b"\x00")
        digest.update(str(part).encode())
    return digest.digest()


def processor_key(operation: str, scope: str, request_id: str) -> str:
    """The idempotency key sent to the processor for a request: stable across retries."""
    return f"{operation}:{scope}:{request_id}"


# -- pages -------------------------------------------------------------------------------


def page_size(requested: int) -> int:
    """The page size to use: the default for 0, at most :data:`MAX_PAGE_SIZE`."""
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_page_token(query: str, parent: str, last_id: str) -> str:
    """An opaque token resuming ``query`` on ``parent`` after the row ``last_id``."""
    raw = f"{query}\x00{parent}\x00{last_id}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_page_token(token: str, query: str, parent: str) -> str | None:
    """The id a page token resumes after; ``None`` for the first page.

    :raises InvalidArgument: ``PAGE_TOKEN_INVALID`` when malformed or from another query.
    """
    if not token:
        return None
    parts: list[str] = []
    if _TOKEN_ALPHABET.match(token):
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            parts = raw.split("\x00")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            parts = []
    if len(parts) != 3 or parts[0] != query or parts[1] != parent or not parts[2]:
        raise InvalidArgument(
            "page_token is malformed or belongs to another query",
            reason="PAGE_TOKEN_INVALID",
            field_violations=[("page_token", "malformed or from another query")],
        )
    return parts[2]
