"""Payments' use cases: the steps between the servicer, the store and the processor.

Each money-moving request runs under its idempotency key (:meth:`Payments._idempotent`):
the key is claimed first; a final outcome (success or refusal) is recorded and replayed to
repeats; an outcome that is not final (processor unavailable) ends the claim's lease so a
retry with the same key resumes where the first attempt stopped. Processor calls carry
keys derived from the request key, so a resumed attempt never charges twice, and a call
whose answer was lost is reconciled by looking the charge up rather than guessed.

A purchase reserves its seat before charging (:meth:`PostgresPaymentsStore.reserve_seat`),
so capacity can never be oversold, and gives the seat back only when it knows no money
was taken.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from google.protobuf import message as pb_message
from spaces.payments.v1 import payments_resources_pb2 as pb

from services.common import errors
from services.common.auth import Principal
from services.common.context import time_remaining
from services.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from services.common.ids import new_id
from services.payments import convert, domain, metrics
from services.payments.domain import (
    Offering,
    OfferingState,
    SpaceFacts,
    SpaceState,
    fee_split,
)
from services.payments.processor import (
    CardDeclined,
    CardProcessor,
    Charge,
    ChargeStatus,
    ProcessorError,
    ProcessorTimeout,
)
from services.payments.stage import StageDirectory
from services.payments.store import (
    ClaimStatus,
    IdemDone,
    PaymentsStore,
    PayoutRecord,
    ReserveOutcome,
    Settlement,
    TicketRecord,
    TipRecord,
)

logger = logging.getLogger(__name__)

__all__ = ["Clock", "Payments", "PaymentsConfig"]

M = TypeVar("M", bound=pb_message.Message)
T = TypeVar("T")
Clock = Callable[[], dt.datetime]

_FINAL_CODES: dict[str, type[ServiceError]] = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "NOT_FOUND": errors.NotFound,
    "ALREADY_EXISTS": errors.AlreadyExists,
    "PERMISSION_DENIED": errors.PermissionDenied,
    "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
}
_DECLINE_REASONS = {"insufficient_funds": "INSUFFICIENT_FUNDS"}
_BUSY_WAIT_S = 5.0


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass(frozen=True)
class PaymentsConfig:
    """The settings the use cases need.

    :ivar fee_bps: platform fee in basis points.
    :ivar lease_s: idempotency lease of a running request.
    :ivar processor_timeout_s: longest wait for one processor call.
    :ivar refund_concurrency: refunds in flight at once in a mass refund.
    :ivar tip_min_minor: smallest tip.
    :ivar tip_max_minor: largest tip.
    """

    fee_bps: int = 1000
    lease_s: float = 30.0
    processor_timeout_s: float = 5.0
    refund_concurrency: int = 8
    tip_min_minor: int = 100
    tip_max_minor: int = 50_000


class _NotCharged(Exception):
    """Reconciliation proved the processor took no money."""


class Payments:
    """The payments use cases.

    :param store: storage.
    :param processor: the card processor.
    :param stage: who is on a Space's stage (tips).
    :param config: fee and timing.
    :param clock: current time (tests may pin it).
    """

    def __init__(
        self,
        store: PaymentsStore,
        processor: CardProcessor,
        stage: StageDirectory,
        config: PaymentsConfig,
        clock: Clock = _utcnow,
    ) -> None:
        self._store = store
        self._processor = processor
        self._stage = stage
        self._config = config
        self._now = clock

    @property
    def store(self) -> PaymentsStore:
        return self._store

    # -- idempotency -------------------------------------------------------------------

    async def _idempotent(
        self,
        scope: str,
        request_id: str,
        operation: str,
        fingerprint: bytes,
        response_type: type[M],
        run: Callable[[uuid.UUID, bool], Awaitable[M]],
    ) -> M:
        """Run ``run(request uuid, resumed)`` at most once per key to a final outcome."""
        key = uuid.UUID(request_id)
        # A repeat racing the first attempt waits for its outcome, as long as the caller's
        # own deadline allows (and never past the first attempt's lease).
        remaining = time_remaining()
        wait_s = _BUSY_WAIT_S if remaining is None else max(0.0, remaining - 0.5)
        deadline = time.monotonic() + min(self._config.lease_s, wait_s)
        while True:
            claim = await self._store.claim(
                scope, key, operation, fingerprint, self._config.lease_s
            )
            if claim.status is not ClaimStatus.BUSY:
                break
            if time.monotonic() > deadline:
                raise Aborted(
                    "a request with this request_id is still running; retry shortly",
                    reason="REQUEST_IN_PROGRESS",
                    retry_after=1.0,
                )
            # The first attempt is still running: wait for its outcome rather than race it.
            await asyncio.sleep(0.05)
        if claim.status is ClaimStatus.MISMATCH:
            raise FailedPrecondition(
                "request_id was used for a different request", reason="IDEMPOTENCY_KEY_REUSED"
            )
        if claim.status is ClaimStatus.DONE:
            if claim.response is not None:
                return response_type.FromString(claim.response)
            raise _replayed_error(claim.error_code, claim.error_reason, claim.error_message)
        try:
            result = await run(key, claim.status is ClaimStatus.RESUMED)
        except ServiceError as error:
            if error.code.name in _FINAL_CODES:
                await self._store.fail_request(
                    scope, key, error.code.name, error.reason, error.message
                )
            else:
                await self._store.release_request(scope, key)
            raise
        except BaseException:
            await asyncio.shield(self._store.release_request(scope, key))
            raise
        await self._store.complete_request(scope, key, result.SerializeToString())
        return result

    # -- offerings ---------------------------------------------------------------------

    async def create_offering(
        self,
        principal: Principal,
        space_id: str,
        price_minor: int,
        currency_code: str,
        capacity: int,
        sales_end_time: dt.datetime | None,
        request_id: str,
    ) -> pb.TicketOffering:
        """Make a scheduled Space ticketed (host only)."""
        caller = domain.caller_user_id(principal) if principal.is_user else "service"
        fingerprint = domain.fingerprint(
            "offer", space_id, price_minor, currency_code, capacity, str(sales_end_time)
        )

        async def run(key: uuid.UUID, resumed: bool) -> pb.TicketOffering:
            space = await self._visible_space_or_not_found(space_id, principal)
            domain.require_host(space, principal)
            now = self._now()
            if resumed:
                # The first attempt may have committed the offering before it stopped.
                existing = await self._store.get_offering(space_id)
                if existing is not None:
                    return convert.offering_pb(existing, space, now)
            if space.state is not SpaceState.SCHEDULED:
                raise FailedPrecondition(
                    "only a scheduled Space can sell tickets", reason="SPACE_NOT_SCHEDULED"
                )
            domain.check_currency(
                currency_code, self._processor.currencies, "ticket_offering.price.currency_code"
            )
            offering = Offering(
                space_id=space_id,
                host_id=space.host_id,
                price_minor=price_minor,
                currency_code=currency_code,
                capacity=capacity,
                sold_count=0,
                reserved_count=0,
                sales_end_time=sales_end_time,
                state=OfferingState.ON_SALE,
                create_time=now,
                update_time=now,
            )
            response = convert.offering_pb(offering, space, now)
            created = await self._store.create_offering(
                offering, IdemDone(caller, key, response.SerializeToString())
            )
            if not created:
                raise errors.AlreadyExists(
                    "the Space already has a ticket offering", reason="TICKET_OFFERING_EXISTS"
                )
            return response

        return await self._idempotent(
            caller, request_id, "CreateTicketOffering", fingerprint, pb.TicketOffering, run
        )

    async def get_offering(self, principal: Principal, space_id: str) -> pb.TicketOffering:
        offering = await self._store.get_offering(space_id)
        if offering is None or not await self._may_see(space_id, offering.host_id, principal):
            raise domain.offering_not_found()
        space = await self._store.get_space(space_id)
        return convert.offering_pb(offering, space, self._now())

    async def update_offering(
        self,
        principal: Principal,
        space_id: str,
        paths: Sequence[str],
        *,
        price_minor: int,
        currency_code: str,
        capacity: int,
        sales_end_time: dt.datetime | None,
    ) -> pb.TicketOffering:
        """Change price, capacity or sales end of an offering still on sale (host only)."""
        offering = await self._store.get_offering(space_id)
        space = await self._store.get_space(space_id)
        if offering is None or not await self._may_see(space_id, offering.host_id, principal):
            raise domain.offering_not_found()
        if not principal.is_user or principal.user_id != offering.host_id:
            raise errors.PermissionDenied("only the Space's host may do this", reason="NOT_HOST")
        if "price" in paths:
            domain.check_currency(
                currency_code, self._processor.currencies, "ticket_offering.price.currency_code"
            )
        now = self._now()

        def change(current: Offering) -> Offering:
            domain.check_offering_update(
                current,
                space,
                paths,
                capacity=capacity,
                price_minor=price_minor,
                currency_code=currency_code,
                now=now,
            )
            return dataclasses.replace(
                current,
                price_minor=price_minor if "price" in paths else current.price_minor,
                currency_code=currency_code if "price" in paths else current.currency_code,
                capacity=capacity if "capacity" in paths else current.capacity,
                sales_end_time=sales_end_time
                if "sales_end_time" in paths
                else current.sales_end_time,
                update_time=now,
            )

        updated = await self._store.update_offering(space_id, change)
        if updated is None:
            raise domain.offering_not_found()
        return convert.offering_pb(updated, space, now)

    # -- purchases ---------------------------------------------------------------------

    async def purchase(
        self,
        principal: Principal,
        space_id: str,
        request_id: str,
        payment_method: str,
        price_minor: int,
        currency_code: str,
    ) -> pb.Ticket:
        """Buy the caller a ticket: reserve a seat, charge, then book the sale."""
        buyer = domain.caller_user_id(principal)
        fingerprint = domain.fingerprint(
            "purchase", space_id, payment_method, price_minor, currency_code
        )

        async def run(key: uuid.UUID, resumed: bool) -> pb.Ticket:
            return await self._purchase(
                buyer, space_id, key, payment_method, price_minor, currency_code, resumed
            )

        try:
            ticket = await self._idempotent(
                buyer, request_id, "PurchaseTicket", fingerprint, pb.Ticket, run
            )
        except ServiceError as error:
            metrics.PURCHASES.labels(error.reason.lower()).inc()
            raise
        metrics.PURCHASES.labels("ok").inc()
        return ticket

    async def _purchase(
        self,
        buyer: str,
        space_id: str,
        key: uuid.UUID,
        payment_method: str,
        price_minor: int,
        currency_code: str,
        resumed: bool,
    ) -> pb.Ticket:
        # Only a resumed attempt can have left a ticket behind: a new key skips the lookup.
        ticket = await self._store.find_ticket_by_request(buyer, key) if resumed else None
        if ticket is None:
            offering, space = await self._store.get_offering_and_space(space_id)
            if offering is not None and not await self._may_see_as(
                space_id, offering.host_id, buyer
            ):
                # Hidden from the buyer: exactly as if the Space were not ticketed.
                raise domain.offering_not_found()
            now = self._now()
            domain.check_purchase(offering, space, buyer, price_minor, currency_code, now)
            assert offering is not None
            self._check_payment_method(payment_method)
            split = fee_split(price_minor, self._config.fee_bps)
            candidate = TicketRecord(
                id=new_id(),
                space_id=space_id,
                owner_id=buyer,
                host_id=offering.host_id,
                price_minor=price_minor,
                fee_minor=split.fee,
                currency_code=currency_code,
                state="reserved",
                refund_reason=None,
                refund_note="",
                request_scope=buyer,
                request_id=key,
                processor_key=domain.processor_key("purchase", buyer, str(key)),
                charge_id=None,
                settled=False,
                create_time=now,
                refund_time=None,
            )
            outcome, ticket = await self._store.reserve_seat(candidate, price_minor, currency_code)
            _raise_for_reservation(outcome)
            assert ticket is not None
        if ticket.state != "reserved":
            return convert.ticket_pb(ticket)  # an earlier attempt finished it
        try:
            charge = await self._charge(
                ticket.processor_key, ticket.price_minor, ticket.currency_code, payment_method
            )
        except CardDeclined as declined:
            await self._store.release_seat(ticket.id)
            raise _decline_error(declined.code) from None
        except _NotCharged:
            await self._store.release_seat(ticket.id)
            raise _processor_unavailable() from None
        return await self._confirm(ticket, charge)

    async def _confirm(self, ticket: TicketRecord, charge: Charge) -> pb.Ticket:
        """Book a charged seat as a paid ticket (and refund it at once if the Space was
        canceled while the charge was in flight)."""
        now = self._now()
        split = fee_split(ticket.price_minor, self._config.fee_bps)
        name = domain.ticket_name(ticket.space_id, ticket.id)
        paid = dataclasses.replace(ticket, state="paid", charge_id=charge.id)
        response = convert.ticket_pb(paid)
        confirmed, offering_state = await self._store.confirm_ticket(
            ticket.space_id,
            ticket.id,
            charge.id,
            domain.sale_entry(name, ticket.id, ticket.host_id, split, ticket.currency_code),
            lambda sold: convert.ticket_purchased(paid, sold, now),
            IdemDone(ticket.request_scope, ticket.request_id, response.SerializeToString()),
            _late_settlement(ticket, split.net),
        )
        if offering_state is OfferingState.CANCELED and confirmed.state == "paid":
            logger.info("ticket %s was paid after its Space was canceled; refunding", name)
            confirmed = await self._refund(confirmed, "space_canceled", "")
            return convert.ticket_pb(confirmed)
        return convert.ticket_pb(confirmed) if confirmed.state != "paid" else response

    def _check_payment_method(self, payment_method: str) -> None:
        if not payment_method.startswith("tok_") and not self._processor.accepts_raw_cards:
            raise InvalidArgument(
                "card numbers may only be sent to the sandbox processor; use a token",
                reason="RAW_CARD_NOT_ALLOWED",
                field_violations=[("payment_method", "use a processor token")],
            )

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await asyncio.wait_for(call, self._config.processor_timeout_s)
        except TimeoutError:
            raise ProcessorTimeout(f"{operation} timed out") from None
        finally:
            metrics.PROCESSOR_LATENCY.labels(operation).observe(time.perf_counter() - started)

    async def _charge(
        self, key: str, amount_minor: int, currency_code: str, payment_method: str
    ) -> Charge:
        """Authorize and capture under ``key``; reconcile when an answer is lost.

        :raises CardDeclined: a final decline.
        :raises _NotCharged: the processor proved it took nothing.
        :raises Unavailable: the outcome is unknown; the seat stays reserved and a retry
            (or the reservation sweeper) reconciles it.
        """
        try:
            charge = await self._call(
                "authorize",
                self._processor.authorize(
                    idempotency_key=key,
                    amount_minor=amount_minor,
                    currency_code=currency_code,
                    payment_method=payment_method,
                ),
            )
        except CardDeclined as declined:
            metrics.DECLINES.labels(declined.code).inc()
            raise
        except ProcessorError:
            logger.warning("authorization %s got no answer; reconciling", key)
            found = await self._reconcile(key)
            if found is None or found.status is ChargeStatus.VOIDED:
                raise _NotCharged() from None
            if found.status is ChargeStatus.DECLINED:
                metrics.DECLINES.labels(found.decline_code or "card_declined").inc()
                raise CardDeclined(found.decline_code or "card_declined") from None
            charge = found
        if charge.status is ChargeStatus.AUTHORIZED:
            try:
                charge = await self._call("capture", self._processor.capture(charge.id))
            except ProcessorError:
                raise _processor_unavailable() from None
        return charge

    async def _reconcile(self, key: str) -> Charge | None:
        try:
            return await self._call("find_charge", self._processor.find_charge(key))
        except ProcessorError:
            raise _processor_unavailable() from None

    async def sweep_reservation(self, ticket: TicketRecord) -> None:
        """Finish a purchase that stopped before an outcome, from the processor's records.

        It first takes the request's idempotency lease, so it never races a client retry
        resuming the same purchase (which would otherwise be charged for a released seat).
        """
        if not await self._store.take_over(
            ticket.request_scope, ticket.request_id, self._config.lease_s
        ):
            return
        charge = await self._reconcile(ticket.processor_key)
        if charge is None or charge.status in (ChargeStatus.DECLINED, ChargeStatus.VOIDED):
            logger.info("releasing seat of unfinished purchase %s (no charge)", ticket.id)
            await self._store.release_seat(ticket.id)
            if charge is not None and charge.status is ChargeStatus.DECLINED:
                error = _decline_error(charge.decline_code or "card_declined")
                await self._store.fail_request(
                    ticket.request_scope,
                    ticket.request_id,
                    error.code.name,
                    error.reason,
                    error.message,
                )
            else:
                # No money was taken: a retry with the same key may simply try again.
                await self._store.release_request(ticket.request_scope, ticket.request_id)
            return
        if charge.status is ChargeStatus.AUTHORIZED:
            charge = await self._call("capture", self._processor.capture(charge.id))
        logger.info("completing unfinished purchase %s from its charge", ticket.id)
        await self._confirm(ticket, charge)

    # -- tickets -----------------------------------------------------------------------

    async def get_ticket(self, principal: Principal, space_id: str, ticket_id: str) -> pb.Ticket:
        ticket = await self._store.get_ticket(space_id, ticket_id)
        if ticket is None or not _may_see_ticket(ticket, principal):
            raise NotFound("no such ticket", reason="TICKET_NOT_FOUND")
        return convert.ticket_pb(ticket)

    async def list_tickets(
        self,
        principal: Principal,
        space_segment: str,
        state: str | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[pb.Ticket], str]:
        """Tickets newest first: the caller's own, or all of a Space's for its host."""
        parent = f"spaces/{space_segment}"
        before = domain.decode_page_token(page_token, "tickets", parent)
        space_id: str | None = None
        owner: str | None = None
        if space_segment == "-":
            owner = domain.caller_user_id(principal)
        else:
            space = await self._visible_space_or_not_found(space_segment, principal)
            space_id = space.id
            if not principal.is_service and principal.user_id != space.host_id:
                owner = domain.caller_user_id(principal)
        limit = domain.page_size(page_size)
        rows = await self._store.list_tickets(
            space_id=space_id, owner_id=owner, state=state, before=before, limit=limit + 1
        )
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = domain.encode_page_token("tickets", parent, rows[-1].id)
        return [convert.ticket_pb(row) for row in rows], token

    async def refund_ticket(
        self, principal: Principal, space_id: str, ticket_id: str, note: str
    ) -> pb.Ticket:
        """Refund one ticket (the host, or a Spaces service with reason SYSTEM)."""
        ticket = await self._store.get_ticket(space_id, ticket_id)
        if ticket is None or not _may_see_ticket(ticket, principal):
            raise NotFound("no such ticket", reason="TICKET_NOT_FOUND")
        if principal.is_service:
            reason = "system"
        elif principal.user_id == ticket.host_id:
            reason = "host"
        else:
            raise errors.PermissionDenied(
                "only the Space's host can refund tickets", reason="NOT_HOST"
            )
        if ticket.state == "refunded":
            return convert.ticket_pb(ticket)
        return convert.ticket_pb(await self._refund(ticket, reason, note))

    async def _refund(self, ticket: TicketRecord, reason: str, note: str) -> TicketRecord:
        """Start (or resume) a ticket's refund and drive it to the processor's confirmation.

        Exactly once, across crashes: the ledger entry is booked with the state change to
        REFUND_PENDING (once, by a conditional update and a unique dedupe key); the
        processor refund carries a key derived from the ticket, so repeating it returns
        the same refund; confirming is again a conditional update.
        """
        name = domain.ticket_name(ticket.space_id, ticket.id)
        # The fee charged at sale time, not today's rate: the refund mirrors the sale.
        split = domain.FeeSplit(
            gross=ticket.price_minor,
            fee=ticket.fee_minor,
            net=ticket.price_minor - ticket.fee_minor,
        )
        current, _ = await self._store.begin_refund(
            ticket.space_id,
            ticket.id,
            reason,
            note,
            lambda t: domain.refund_entry(
                name, t.id, t.host_id, split, t.currency_code, settled=t.settled
            ),
        )
        if current.state != "refund_pending":
            return current
        assert current.charge_id is not None
        try:
            await self._call(
                "refund",
                self._processor.refund(
                    current.charge_id,
                    current.price_minor,
                    idempotency_key=f"refund:{current.id}",
                ),
            )
        except ProcessorError:
            # The ticket is already invalid and its entry booked; the worker retries.
            raise _processor_unavailable() from None
        now = self._now()
        done, completed = await self._store.complete_refund(
            current.id, now, lambda t: convert.ticket_refunded(t, now)
        )
        if completed:
            metrics.REFUNDS.labels(done.refund_reason or "system").inc()
        return done

    async def resume_refund(self, ticket: TicketRecord) -> None:
        """Finish a refund left REFUND_PENDING by a crash or an outage (worker)."""
        await self._refund(ticket, ticket.refund_reason or "system", ticket.refund_note)

    async def check_ticket(self, space_id: str, user_id: str) -> tuple[bool, str]:
        """Whether the Space needs a ticket, and the user's valid ticket name (or "")."""
        offering = await self._store.get_offering(space_id)
        if offering is None or offering.state is OfferingState.CANCELED:
            return False, ""
        ticket = await self._store.valid_ticket(space_id, user_id)
        return True, domain.ticket_name(space_id, ticket.id) if ticket is not None else ""

    async def refund_all(self, space_id: str, max_tickets: int) -> tuple[int, int]:
        """Refund up to ``max_tickets`` tickets of a canceled Space; return (done, left)."""
        if await self._store.get_settlement(space_id) is not None:
            raise _revenue_settled()
        state = await self._store.cancel_offering(space_id)
        if state is None:
            return 0, 0
        if state is OfferingState.SETTLED:
            raise _revenue_settled()
        tickets = await self._store.tickets_to_refund(space_id, max_tickets)
        gate = asyncio.Semaphore(self._config.refund_concurrency)

        async def refund(ticket: TicketRecord) -> bool:
            async with gate:
                done = await self._refund(
                    ticket, ticket.refund_reason or "space_canceled", ticket.refund_note
                )
                return done.state == "refunded"

        results = await asyncio.gather(*(refund(t) for t in tickets), return_exceptions=True)
        refunded = sum(1 for result in results if result is True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            unexpected = [f for f in failures if not isinstance(f, Unavailable)]
            if unexpected:
                raise unexpected[0]
            raise _processor_unavailable()
        return refunded, await self._store.count_unrefunded(space_id)

    async def refund_all_until_done(self, space_id: str, batch: int) -> None:
        """Run :meth:`refund_all` in batches while it makes progress (event handler)."""
        while True:
            refunded, remaining = await self.refund_all(space_id, batch)
            if remaining == 0 or refunded == 0:
                return

    async def settle(self, space_id: str) -> Settlement:
        """Release a Space's held revenue to its payees' available balances."""
        return await self._store.settle(
            space_id,
            self._now(),
            lambda payee, currency, amount: domain.settlement_entry(
                space_id, payee, amount, currency
            ),
        )

    # -- tips --------------------------------------------------------------------------

    async def send_tip(
        self,
        principal: Principal,
        space_id: str,
        request_id: str,
        recipient_segment: str,
        amount_minor: int,
        currency_code: str,
        message: str,
        payment_method: str,
    ) -> pb.Tip:
        """Charge the caller and give the amount to someone on a live Space's stage."""
        sender = domain.caller_user_id(principal)
        recipient = sender if recipient_segment == domain.ME else recipient_segment
        fingerprint = domain.fingerprint(
            "tip", space_id, recipient, amount_minor, currency_code, message, payment_method
        )

        async def run(key: uuid.UUID, resumed: bool) -> pb.Tip:
            tip = await self._store.find_tip_by_request(sender, key) if resumed else None
            if tip is None:
                tip = await self._new_tip(
                    sender,
                    space_id,
                    key,
                    recipient,
                    amount_minor,
                    currency_code,
                    message,
                    payment_method,
                )
            if tip.state == "paid":
                return convert.tip_pb(tip)
            try:
                charge = await self._charge(
                    tip.processor_key, tip.amount_minor, tip.currency_code, payment_method
                )
            except CardDeclined as declined:
                await self._store.drop_tip(tip.id)
                raise _decline_error(declined.code) from None
            except _NotCharged:
                await self._store.drop_tip(tip.id)
                raise _processor_unavailable() from None
            return convert.tip_pb(await self._book_tip(tip, charge))

        return await self._idempotent(sender, request_id, "SendTip", fingerprint, pb.Tip, run)

    async def _new_tip(
        self,
        sender: str,
        space_id: str,
        key: uuid.UUID,
        recipient: str,
        amount_minor: int,
        currency_code: str,
        message: str,
        payment_method: str,
    ) -> TipRecord:
        """Check a tip and record it as pending, before any money moves."""
        space = await self._space_or_not_found(space_id)
        if not await self._may_see_as(space_id, space.host_id, sender):
            raise NotFound("no such Space", reason="SPACE_NOT_FOUND")
        if space.state is not SpaceState.LIVE:
            raise FailedPrecondition("the Space is not live", reason="SPACE_NOT_LIVE")
        if recipient == sender:
            raise InvalidArgument(
                "you cannot tip yourself",
                reason="CANNOT_TIP_SELF",
                field_violations=[("recipient", "is the caller")],
            )
        domain.check_currency(currency_code, self._processor.currencies, "amount.currency_code")
        domain.check_tip_amount(
            amount_minor, self._config.tip_min_minor, self._config.tip_max_minor
        )
        self._check_payment_method(payment_method)
        if recipient != space.host_id and not await self._stage.is_on_stage(space_id, recipient):
            raise FailedPrecondition(
                "the recipient is not on the Space's stage", reason="RECIPIENT_NOT_ON_STAGE"
            )
        split = fee_split(amount_minor, self._config.fee_bps)
        return await self._store.begin_tip(
            TipRecord(
                id=new_id(),
                space_id=space_id,
                sender_id=sender,
                recipient_id=recipient,
                amount_minor=amount_minor,
                fee_minor=split.fee,
                currency_code=currency_code,
                message=message,
                state="pending",
                request_scope=sender,
                request_id=key,
                processor_key=domain.processor_key("tip", sender, str(key)),
                charge_id=None,
                settled=False,
                create_time=self._now(),
            )
        )

    async def _book_tip(self, tip: TipRecord, charge: Charge) -> TipRecord:
        name = domain.tip_name(tip.space_id, tip.id)
        split = domain.FeeSplit(tip.amount_minor, tip.fee_minor, tip.amount_minor - tip.fee_minor)
        paid = dataclasses.replace(tip, state="paid", charge_id=charge.id)
        now = self._now()
        response = convert.tip_pb(paid)
        booked = await self._store.book_tip(
            tip,
            charge.id,
            domain.tip_entry(name, tip.id, tip.recipient_id, split, tip.currency_code),
            convert.tip_sent(paid, now),
            IdemDone(tip.request_scope, tip.request_id, response.SerializeToString()),
            dataclasses.replace(
                domain.settlement_entry(
                    tip.space_id, tip.recipient_id, split.net, tip.currency_code
                ),
                dedupe_key=f"settle-tip:{tip.id}",
            ),
        )
        metrics.TIPS.inc()
        return booked

    async def sweep_tip(self, tip: TipRecord) -> None:
        """Finish a tip whose request stopped before an outcome, from the processor's records."""
        if not await self._store.take_over(tip.request_scope, tip.request_id, self._config.lease_s):
            return
        charge = await self._reconcile(tip.processor_key)
        if charge is None or charge.status in (ChargeStatus.DECLINED, ChargeStatus.VOIDED):
            await self._store.drop_tip(tip.id)
            await self._store.release_request(tip.request_scope, tip.request_id)
            return
        if charge.status is ChargeStatus.AUTHORIZED:
            charge = await self._call("capture", self._processor.capture(charge.id))
        logger.info("completing unfinished tip %s from its charge", tip.id)
        await self._book_tip(tip, charge)

    # -- balances and payouts ----------------------------------------------------------

    async def balance(self, principal: Principal, segment: str) -> pb.Balance:
        user_id = domain.resolve_owner(segment, principal)
        return convert.balance_pb(user_id, await self._store.balances(user_id))

    async def ledger_entries(
        self, principal: Principal, segment: str, page_size: int, page_token: str
    ) -> tuple[list[pb.LedgerEntry], str]:
        user_id = domain.resolve_owner(segment, principal)
        parent = domain.user_name(user_id)
        before = domain.decode_page_token(page_token, "ledger", parent)
        limit = domain.page_size(page_size)
        rows = await self._store.ledger_entries(user_id, before, limit + 1)
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = domain.encode_page_token("ledger", parent, rows[-1].id)
        return [convert.entry_pb(user_id, row) for row in rows], token

    async def request_payout(
        self,
        principal: Principal,
        segment: str,
        amount_minor: int,
        currency_code: str,
        request_id: str,
    ) -> pb.Payout:
        """Reserve part of the caller's available balance for a payout."""
        user_id = domain.require_owner_user(segment, principal)
        fingerprint = domain.fingerprint("payout", amount_minor, currency_code)

        async def run(key: uuid.UUID, resumed: bool) -> pb.Payout:
            existing = await self._store.find_payout_by_request(user_id, key)
            if existing is not None:
                return convert.payout_pb(existing)
            domain.check_currency(currency_code, self._processor.currencies, "amount.currency_code")
            payout = PayoutRecord(
                id=new_id(),
                user_id=user_id,
                amount_minor=amount_minor,
                currency_code=currency_code,
                state="pending",
                failure_reason="",
                request_id=key,
                create_time=self._now(),
                complete_time=None,
            )
            name = domain.payout_name(user_id, payout.id)
            response = convert.payout_pb(payout)
            await self._store.request_payout(
                payout,
                domain.payout_requested_entry(
                    name, payout.id, user_id, amount_minor, currency_code
                ),
                IdemDone(user_id, key, response.SerializeToString()),
            )
            return response

        return await self._idempotent(
            user_id, request_id, "RequestPayout", fingerprint, pb.Payout, run
        )

    async def get_payout(self, principal: Principal, segment: str, payout_id: str) -> pb.Payout:
        user_id = domain.resolve_owner(segment, principal)
        payout = await self._store.get_payout(user_id, payout_id)
        if payout is None:
            raise NotFound("no such payout", reason="PAYOUT_NOT_FOUND")
        return convert.payout_pb(payout)

    async def list_payouts(
        self, principal: Principal, segment: str, page_size: int, page_token: str
    ) -> tuple[list[pb.Payout], str]:
        user_id = domain.resolve_owner(segment, principal)
        parent = domain.user_name(user_id)
        before = domain.decode_page_token(page_token, "payouts", parent)
        limit = domain.page_size(page_size)
        rows = await self._store.list_payouts(user_id, before, limit + 1)
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = domain.encode_page_token("payouts", parent, rows[-1].id)
        return [convert.payout_pb(row) for row in rows], token

    async def pay_out(self, payout: PayoutRecord) -> None:
        """Send a pending payout through the processor and book the outcome (worker)."""
        result = await self._call(
            "payout",
            self._processor.payout(
                idempotency_key=f"payout:{payout.id}",
                payee=payout.user_id,
                amount_minor=payout.amount_minor,
                currency_code=payout.currency_code,
            ),
        )
        name = domain.payout_name(payout.user_id, payout.id)
        make = domain.payout_paid_entry if result.paid else domain.payout_failed_entry
        now = self._now()
        done = await self._store.complete_payout(
            payout.id,
            result.paid,
            result.failure_reason,
            now,
            make(name, payout.id, payout.user_id, payout.amount_minor, payout.currency_code),
            lambda p: convert.payout_completed(p, now),
        )
        if done is not None:
            metrics.PAYOUTS.labels("paid" if result.paid else "failed").inc()

    # -- helpers -----------------------------------------------------------------------

    async def _space_or_not_found(self, space_id: str) -> SpaceFacts:
        space = await self._store.get_space(space_id)
        if space is None:
            raise NotFound("no such Space", reason="SPACE_NOT_FOUND")
        return space

    async def _visible_space_or_not_found(self, space_id: str, principal: Principal) -> SpaceFacts:
        """The Space, if the caller may see it; else SPACE_NOT_FOUND, as if it did not exist
        (a hidden Space answered otherwise, e.g. NOT_HOST, would give its existence away)."""
        space = await self._space_or_not_found(space_id)
        if not await self._may_see(space_id, space.host_id, principal):
            raise NotFound("no such Space", reason="SPACE_NOT_FOUND")
        return space

    async def _may_see(self, space_id: str, host_id: str, principal: Principal) -> bool:
        """Services see every Space; users as rooms decides."""
        if not principal.is_user:
            return True
        return await self._may_see_as(space_id, host_id, domain.caller_user_id(principal))

    async def _may_see_as(self, space_id: str, host_id: str, user_id: str) -> bool:
        # The host always sees their Space: no need to ask rooms.
        return user_id == host_id or await self._stage.may_see(space_id, user_id)


def _late_settlement(ticket: TicketRecord, net: int) -> domain.JournalEntry:
    """Settles a ticket paid after its Space's revenue was already released."""
    base = domain.settlement_entry(ticket.space_id, ticket.host_id, net, ticket.currency_code)
    return dataclasses.replace(base, dedupe_key=f"settle-ticket:{ticket.id}")


def _may_see_ticket(ticket: TicketRecord, principal: Principal) -> bool:
    return principal.is_service or principal.user_id in (ticket.owner_id, ticket.host_id)


def _raise_for_reservation(outcome: ReserveOutcome) -> None:
    if outcome is ReserveOutcome.RESERVED:
        return
    if outcome is ReserveOutcome.MISSING:
        raise domain.offering_not_found()
    if outcome is ReserveOutcome.CLOSED:
        raise domain.sales_closed()
    if outcome is ReserveOutcome.PRICE_CHANGED:
        raise FailedPrecondition(
            "the price changed; show the new price and ask again", reason="PRICE_CHANGED"
        )
    if outcome is ReserveOutcome.ALREADY_OWNED:
        raise domain.already_owned()
    raise domain.sold_out()


def _decline_error(code: str) -> FailedPrecondition:
    reason = _DECLINE_REASONS.get(code, "CARD_DECLINED")
    return FailedPrecondition(
        f"the processor declined the payment method ({code})",
        reason=reason,
        metadata={"decline_code": code},
    )


def _processor_unavailable() -> Unavailable:
    return Unavailable(
        "the processor did not answer in time; retry with the same request_id",
        reason="PROCESSOR_UNAVAILABLE",
        retry_after=1.0,
    )


def _revenue_settled() -> FailedPrecondition:
    return FailedPrecondition(
        "the Space's revenue was settled; refund tickets one by one", reason="REVENUE_SETTLED"
    )


def _replayed_error(code: str | None, reason: str | None, message: str | None) -> ServiceError:
    """The refusal an idempotency key recorded, raised again for a repeat."""
    cls = _FINAL_CODES.get(code or "", errors.FailedPrecondition)
    text = message or "refused"
    if cls is errors.ResourceExhausted:
        return errors.ResourceExhausted(
            text, reason=reason, quota_subject="space", quota_description="ticket capacity"
        )
    return cls(text, reason=reason)
