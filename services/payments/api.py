"""The gRPC servicer of ``spaces.payments.v1.PaymentsService``.

It decodes requests (protovalidate has already checked their rules), finds the caller
with :func:`services.common.context.current_principal`, calls the use cases in
:mod:`services.payments.flows` and encodes the answers. Refusals are
:class:`~services.common.errors.ServiceError` s raised below it; the error interceptor
turns them into statuses with ``ErrorInfo`` reasons.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from spaces.payments.v1 import payments_service_pb2 as pb
from spaces.payments.v1 import payments_service_pb2_grpc as pb_grpc

from services.common.context import current_principal
from services.payments import convert, domain
from services.payments.flows import Payments

logger = logging.getLogger(__name__)

__all__ = ["PaymentsApi"]


class PaymentsApi(pb_grpc.PaymentsServiceServicer):
    """Implements PaymentsService over :class:`~services.payments.flows.Payments`."""

    def __init__(self, payments: Payments) -> None:
        self._payments = payments

    async def CreateTicketOffering(
        self, request: pb.CreateTicketOfferingRequest, context: Any
    ) -> pb.CreateTicketOfferingResponse:
        offering = request.ticket_offering
        sales_end = (
            offering.sales_end_time.ToDatetime(tzinfo=dt.UTC)
            if offering.HasField("sales_end_time")
            else None
        )
        created = await self._payments.create_offering(
            current_principal(),
            domain.parse_space(request.parent),
            offering.price.amount_minor,
            offering.price.currency_code,
            offering.capacity,
            sales_end,
            request.request_id,
        )
        return pb.CreateTicketOfferingResponse(ticket_offering=created)

    async def GetTicketOffering(
        self, request: pb.GetTicketOfferingRequest, context: Any
    ) -> pb.GetTicketOfferingResponse:
        offering = await self._payments.get_offering(
            current_principal(), domain.parse_offering(request.name)
        )
        return pb.GetTicketOfferingResponse(ticket_offering=offering)

    async def UpdateTicketOffering(
        self, request: pb.UpdateTicketOfferingRequest, context: Any
    ) -> pb.UpdateTicketOfferingResponse:
        offering = request.ticket_offering
        paths = list(request.update_mask.paths)
        sales_end = (
            offering.sales_end_time.ToDatetime(tzinfo=dt.UTC)
            if offering.HasField("sales_end_time")
            else None
        )
        updated = await self._payments.update_offering(
            current_principal(),
            domain.parse_offering(offering.name, "ticket_offering.name"),
            paths,
            price_minor=offering.price.amount_minor,
            currency_code=offering.price.currency_code,
            capacity=offering.capacity,
            sales_end_time=sales_end,
        )
        return pb.UpdateTicketOfferingResponse(ticket_offering=updated)

    async def PurchaseTicket(
        self, request: pb.PurchaseTicketRequest, context: Any
    ) -> pb.PurchaseTicketResponse:
        ticket = await self._payments.purchase(
            current_principal(),
            domain.parse_space(request.parent),
            request.request_id,
            request.payment_method,
            request.price.amount_minor,
            request.price.currency_code,
        )
        return pb.PurchaseTicketResponse(ticket=ticket)

    async def GetTicket(self, request: pb.GetTicketRequest, context: Any) -> pb.GetTicketResponse:
        space_id, ticket_id = domain.parse_ticket(request.name)
        ticket = await self._payments.get_ticket(current_principal(), space_id, ticket_id)
        return pb.GetTicketResponse(ticket=ticket)

    async def ListTickets(
        self, request: pb.ListTicketsRequest, context: Any
    ) -> pb.ListTicketsResponse:
        segment = request.parent.removeprefix("spaces/")
        state = convert.TICKET_STATE_NAMES.get(request.state) if request.state else None
        tickets, token = await self._payments.list_tickets(
            current_principal(), segment, state, request.page_size, request.page_token
        )
        return pb.ListTicketsResponse(tickets=tickets, next_page_token=token)

    async def RefundTicket(
        self, request: pb.RefundTicketRequest, context: Any
    ) -> pb.RefundTicketResponse:
        space_id, ticket_id = domain.parse_ticket(request.name)
        ticket = await self._payments.refund_ticket(
            current_principal(), space_id, ticket_id, request.note
        )
        return pb.RefundTicketResponse(ticket=ticket)

    async def CheckTicket(
        self, request: pb.CheckTicketRequest, context: Any
    ) -> pb.CheckTicketResponse:
        current_principal()
        space_id = domain.parse_space(request.space, "space")
        user_id = domain.parse_user(request.user, "user")
        required, ticket = await self._payments.check_ticket(space_id, user_id)
        return pb.CheckTicketResponse(
            ticket_required=required, has_ticket=bool(ticket), ticket=ticket
        )

    async def RefundAllTickets(
        self, request: pb.RefundAllTicketsRequest, context: Any
    ) -> pb.RefundAllTicketsResponse:
        current_principal()
        refunded, remaining = await self._payments.refund_all(
            domain.parse_space(request.space, "space"),
            request.max_tickets or domain.DEFAULT_REFUND_BATCH,
        )
        return pb.RefundAllTicketsResponse(refunded_count=refunded, remaining_count=remaining)

    async def SettleSpaceRevenue(
        self, request: pb.SettleSpaceRevenueRequest, context: Any
    ) -> pb.SettleSpaceRevenueResponse:
        current_principal()
        settlement = await self._payments.settle(domain.parse_space(request.space, "space"))
        return pb.SettleSpaceRevenueResponse(
            settled_amounts=[
                convert.money(amount, currency)
                for currency, amount in sorted(settlement.amounts.items())
            ],
            settle_time=convert.timestamp(settlement.settle_time),
        )

    async def SendTip(self, request: pb.SendTipRequest, context: Any) -> pb.SendTipResponse:
        tip = await self._payments.send_tip(
            current_principal(),
            domain.parse_space(request.parent),
            request.request_id,
            domain.parse_user(request.recipient, "recipient"),
            request.amount.amount_minor,
            request.amount.currency_code,
            request.message,
            request.payment_method,
        )
        return pb.SendTipResponse(tip=tip)

    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: Any
    ) -> pb.GetBalanceResponse:
        balance = await self._payments.balance(
            current_principal(), domain.parse_balance(request.name)
        )
        return pb.GetBalanceResponse(balance=balance)

    async def ListLedgerEntries(
        self, request: pb.ListLedgerEntriesRequest, context: Any
    ) -> pb.ListLedgerEntriesResponse:
        entries, token = await self._payments.ledger_entries(
            current_principal(),
            domain.parse_user(request.parent),
            request.page_size,
            request.page_token,
        )
        return pb.ListLedgerEntriesResponse(ledger_entries=entries, next_page_token=token)

    async def RequestPayout(
        self, request: pb.RequestPayoutRequest, context: Any
    ) -> pb.RequestPayoutResponse:
        payout = await self._payments.request_payout(
            current_principal(),
            domain.parse_user(request.parent),
            request.amount.amount_minor,
            request.amount.currency_code,
            request.request_id,
        )
        return pb.RequestPayoutResponse(payout=payout)

    async def GetPayout(self, request: pb.GetPayoutRequest, context: Any) -> pb.GetPayoutResponse:
        segment, payout_id = domain.parse_payout(request.name)
        payout = await self._payments.get_payout(current_principal(), segment, payout_id)
        return pb.GetPayoutResponse(payout=payout)

    async def ListPayouts(
        self, request: pb.ListPayoutsRequest, context: Any
    ) -> pb.ListPayoutsResponse:
        payouts, token = await self._payments.list_payouts(
            current_principal(),
            domain.parse_user(request.parent),
            request.page_size,
            request.page_token,
        )
        return pb.ListPayoutsResponse(payouts=payouts, next_page_token=token)
