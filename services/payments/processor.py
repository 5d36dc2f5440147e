"""Card processors: the interface the domain talks to, and the built-in sandbox.

The domain only knows :class:`CardProcessor`. A real provider (Stripe, Adyen...) is one more
class implementing it; nothing else changes. Every call that moves money carries an
idempotency key the processor honours, so a retried call (after a crash or a timeout) is
answered with the first outcome instead of moving money twice, and
:meth:`CardProcessor.find_charge` lets the caller reconcile a call whose answer was lost.

:class:`SandboxCardProcessor` behaves like a provider's test mode and never moves real
money. It keeps its state in ``sandbox_*`` tables of the payments schema (its own
transactions, as if it were remote), so after payments crashes it still remembers what it
did and reconciliation is real. Test payment methods (card numbers or tokens):

=======================  ==========================================  ==========================
card number              token                                       behaviour
=======================  ==========================================  ==========================
4242 4242 4242 4242      ``tok_visa``                                succeeds
4000 0000 0000 0002      ``tok_chargeDeclined``                      declined (card_declined)
4000 0000 0000 9995      ``tok_chargeDeclinedInsufficientFunds``     declined (insufficient_funds)
4000 0000 0000 0119      ``tok_timeout``                             times out, nothing charged
4000 0000 0000 5126      ``tok_timeoutAfterCharge``                  authorized, answer lost
=======================  ==========================================  ==========================

Other Luhn-valid numbers succeed; other numbers and unknown tokens are declined
(``incorrect_number`` / ``invalid_token``). Card numbers are never stored or logged, only
their last four digits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from services.common.db import Pool
from services.common.ids import new_id

logger = logging.getLogger(__name__)

__all__ = [
    "CardDeclined",
    "CardProcessor",
    "Charge",
    "ChargeStatus",
    "PayoutResult",
    "ProcessorError",
    "ProcessorTimeout",
    "Refund",
    "SandboxCardProcessor",
    "TestCards",
]


class ProcessorError(Exception):
    """A processor call failed."""


class CardDeclined(ProcessorError):
    """The processor refused the payment method (a final outcome).

    :param code: the processor's reason, ``card_declined``, ``insufficient_funds``...
    """

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class ProcessorTimeout(ProcessorError):
    """No answer in time: the outcome is unknown until reconciled."""


class ChargeStatus(enum.StrEnum):
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    VOIDED = "voided"
    DECLINED = "declined"


@dataclasses.dataclass(frozen=True)
class Charge:
    """A charge as the processor knows it."""

    id: str
    idempotency_key: str
    amount_minor: int
    currency_code: str
    status: ChargeStatus
    decline_code: str | None = None


@dataclasses.dataclass(frozen=True)
class Refund:
    """A refund of (part of) a charge."""

    id: str
    charge_id: str
    amount_minor: int


@dataclasses.dataclass(frozen=True)
class PayoutResult:
    """The processor's answer to a payout: paid, or failed with a reason."""

    id: str
    paid: bool
    failure_reason: str = ""


class CardProcessor(Protocol):
    """What payments needs from a card processor.

    :ivar name: short name for logs and metrics (``sandbox``).
    :ivar currencies: ISO 4217 codes it takes.
    :ivar accepts_raw_cards: whether card numbers (not only tokens) may be sent to it.
    """

    name: str
    currencies: frozenset[str]
    accepts_raw_cards: bool

    async def authorize(
        self, *, idempotency_key: str, amount_minor: int, currency_code: str, payment_method: str
    ) -> Charge:
        """Authorize a charge (funds held, not yet taken).

        :raises CardDeclined: final refusal (remembered under the key).
        :raises ProcessorTimeout: no answer; reconcile with :meth:`find_charge`.
        """
        ...

    async def capture(self, charge_id: str) -> Charge:
        """Take the authorized funds; capturing a captured charge returns it unchanged."""
        ...

    async def void(self, charge_id: str) -> Charge:
        """Release an authorization that will not be captured."""
        ...

    async def refund(self, charge_id: str, amount_minor: int, *, idempotency_key: str) -> Refund:
        """Refund a captured charge; the same key returns the same refund."""
        ...

    async def find_charge(self, idempotency_key: str) -> Charge | None:
        """The charge made under ``idempotency_key``, if the processor has one."""
        ...

    async def payout(
        self, *, idempotency_key: str, payee: str, amount_minor: int, currency_code: str
    ) -> PayoutResult:
        """Send money to a payee's payout method; the same key returns the same payout."""
        ...


class TestCards:
    """The sandbox's test card numbers."""

    SUCCESS = "4242424242424242"
    DECLINED = "4000000000000002"
    INSUFFICIENT_FUNDS = "4000000000009995"
    TIMEOUT = "4000000000000119"
    TIMEOUT_AFTER_CHARGE = "4000000000005126"


class _Behaviour(enum.Enum):
    SUCCEED = "succeed"
    DECLINE = "card_declined"
    INSUFFICIENT = "insufficient_funds"
    INCORRECT_NUMBER = "incorrect_number"
    INVALID_TOKEN = "invalid_token"
    TIMEOUT = "timeout"
    TIMEOUT_AFTER_CHARGE = "timeout_after_charge"


_CARDS = {
    TestCards.SUCCESS: _Behaviour.SUCCEED,
    TestCards.DECLINED: _Behaviour.DECLINE,
    TestCards.INSUFFICIENT_FUNDS: _Behaviour.INSUFFICIENT,
    TestCards.TIMEOUT: _Behaviour.TIMEOUT,
    TestCards.TIMEOUT_AFTER_CHARGE: _Behaviour.TIMEOUT_AFTER_CHARGE,
}
_TOKENS = {
    "tok_visa": _Behaviour.SUCCEED,
    "tok_mastercard": _Behaviour.SUCCEED,
    "tok_chargeDeclined": _Behaviour.DECLINE,
    "tok_chargeDeclinedInsufficientFunds": _Behaviour.INSUFFICIENT,
    "tok_timeout": _Behaviour.TIMEOUT,
    "tok_timeoutAfterCharge": _Behaviour.TIMEOUT_AFTER_CHARGE,
}
_CARD_LAST4 = {
    "tok_visa": "4242",
    "tok_mastercard": "4444",
    "tok_chargeDeclined": "0002",
    "tok_chargeDeclinedInsufficientFunds": "9995",
    "tok_timeout": "0119",
    "tok_timeoutAfterCharge": "5126",
}


def _luhn_valid(number: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(number)):
        digit = int(char)
        if index % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _behaviour(payment_method: str) -> tuple[_Behaviour, str]:
    if payment_method.startswith("tok_"):
        return (
            _TOKENS.get(payment_method, _Behaviour.INVALID_TOKEN),
            _CARD_LAST4.get(payment_method, "0000"),
        )
    last4 = payment_method[-4:]
    if payment_method in _CARDS:
        return _CARDS[payment_method], last4
    if payment_method.isdigit() and _luhn_valid(payment_method):
        return _Behaviour.SUCCEED, last4
    return _Behaviour.INCORRECT_NUMBER, last4


_CHARGE_COLUMNS = "id, idempotency_key, amount_minor, currency_code, status, decline_code"


def _charge(row: TupleRow | tuple[Any, ...]) -> Charge:
    return Charge(
        id=row[0],
        idempotency_key=row[1],
        amount_minor=row[2],
        currency_code=row[3],
        status=ChargeStatus(row[4]),
        decline_code=row[5],
    )


class SandboxCardProcessor:
    """The built-in test-mode processor (see the module docs for its test cards).

    :param pool: a pool on the payments schema (the ``sandbox_*`` tables).
    :param latency_s: delay added to every call, like a network round trip.
    :param timeout_s: how long the timeout test cards hang before the call fails.
    """

    name = "sandbox"
    currencies = frozenset({"USD", "EUR", "GBP", "CAD", "AUD", "JPY", "CHF", "SEK", "BRL", "INR"})
    accepts_raw_cards = True

    def __init__(self, pool: Pool, *, latency_s: float = 0.0, timeout_s: float = 0.2) -> None:
        self._pool = pool
        self._latency_s = latency_s
        self._timeout_s = timeout_s

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        # Autocommit: each lone statement is one round trip (see the store).
        async with self._pool.connection() as conn:
            if not conn.autocommit:
                await conn.set_autocommit(True)
            yield conn

    async def _network(self) -> None:
        if self._latency_s > 0:
            await asyncio.sleep(self._latency_s)

    async def authorize(
        self, *, idempotency_key: str, amount_minor: int, currency_code: str, payment_method: str
    ) -> Charge:
        """See :meth:`CardProcessor.authorize`."""
        await self._network()
        existing = await self.find_charge(idempotency_key)
        if existing is not None:
            # A repeat: answer what the first call answered, like a real idempotent API.
            if existing.status is ChargeStatus.DECLINED:
                raise CardDeclined(existing.decline_code or "card_declined")
            return existing
        behaviour, last4 = _behaviour(payment_method)
        if behaviour is _Behaviour.TIMEOUT:
            # The request never reached the processor: nothing is recorded.
            await asyncio.sleep(self._timeout_s)
            raise ProcessorTimeout("sandbox: simulated timeout")
        if behaviour is _Behaviour.SUCCEED or behaviour is _Behaviour.TIMEOUT_AFTER_CHARGE:
            status, decline = ChargeStatus.AUTHORIZED, None
        else:
            status, decline = ChargeStatus.DECLINED, behaviour.value
        charge = await self._insert_charge(
            idempotency_key, amount_minor, currency_code, last4, status, decline
        )
        if behaviour is _Behaviour.TIMEOUT_AFTER_CHARGE:
            # The processor did the work, but its answer is lost on the way back.
            await asyncio.sleep(self._timeout_s)
            raise ProcessorTimeout("sandbox: simulated timeout after authorizing")
        if charge.status is ChargeStatus.DECLINED:
            raise CardDeclined(charge.decline_code or "card_declined")
        return charge

    async def _insert_charge(
        self,
        idempotency_key: str,
        amount_minor: int,
        currency_code: str,
        last4: str,
        status: ChargeStatus,
        decline_code: str | None,
    ) -> Charge:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO sandbox_charges (id, idempotency_key, amount_minor, currency_code,"
                " card_last4, status, decline_code) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (idempotency_key) DO NOTHING",
                (
                    "ch_" + new_id(),
                    idempotency_key,
                    amount_minor,
                    currency_code,
                    last4,
                    status.value,
                    decline_code,
                ),
            )
            cursor = await conn.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM sandbox_charges WHERE idempotency_key = %s",
                (idempotency_key,),
            )
            row = await cursor.fetchone()
        assert row is not None
        return _charge(row)

    async def capture(self, charge_id: str) -> Charge:
        """See :meth:`CardProcessor.capture`."""
        await self._network()
        async with self._connection() as conn:
            cursor = await conn.execute(
                "UPDATE sandbox_charges SET status = 'captured'"
                " WHERE id = %s AND status IN ('authorized', 'captured')"
                f" RETURNING {_CHARGE_COLUMNS}",
                (charge_id,),
            )
            row = await cursor.fetchone()
        if row is None:
            raise ProcessorError(f"sandbox: charge {charge_id} cannot be captured")
        return _charge(row)

    async def void(self, charge_id: str) -> Charge:
        """See :meth:`CardProcessor.void`."""
        await self._network()
        async with self._connection() as conn:
            cursor = await conn.execute(
                "UPDATE sandbox_charges SET status = 'voided'"
                " WHERE id = %s AND status IN ('authorized', 'voided')"
                f" RETURNING {_CHARGE_COLUMNS}",
                (charge_id,),
            )
            row = await cursor.fetchone()
        if row is None:
            raise ProcessorError(f"sandbox: charge {charge_id} cannot be voided")
        return _charge(row)

    async def refund(self, charge_id: str, amount_minor: int, *, idempotency_key: str) -> Refund:
        """See :meth:`CardProcessor.refund`."""
        await self._network()
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT id, charge_id, amount_minor FROM sandbox_refunds"
                " WHERE idempotency_key = %s",
                (idempotency_key,),
            )
            row = await cursor.fetchone()
            if row is not None:
                return Refund(id=row[0], charge_id=row[1], amount_minor=row[2])
            cursor = await conn.execute(
                "UPDATE sandbox_charges SET refunded_minor = refunded_minor + %s"
                " WHERE id = %s AND status = 'captured' AND refunded_minor + %s <= amount_minor"
                " RETURNING id",
                (amount_minor, charge_id, amount_minor),
            )
            if await cursor.fetchone() is None:
                raise ProcessorError(f"sandbox: charge {charge_id} cannot be refunded")
            refund_id = "re_" + new_id()
            await conn.execute(
                "INSERT INTO sandbox_refunds (id, charge_id, idempotency_key, amount_minor)"
                " VALUES (%s, %s, %s, %s)",
                (refund_id, charge_id, idempotency_key, amount_minor),
            )
        return Refund(id=refund_id, charge_id=charge_id, amount_minor=amount_minor)

    async def find_charge(self, idempotency_key: str) -> Charge | None:
        """See :meth:`CardProcessor.find_charge`."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM sandbox_charges WHERE idempotency_key = %s",
                (idempotency_key,),
            )
            row = await cursor.fetchone()
        return _charge(row) if row is not None else None

    async def payout(
        self, *, idempotency_key: str, payee: str, amount_minor: int, currency_code: str
    ) -> PayoutResult:
        """See :meth:`CardProcessor.payout`; the sandbox's test bank account always accepts."""
        await self._network()
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO sandbox_payouts (id, idempotency_key, payee, amount_minor,"
                " currency_code, status) VALUES (%s, %s, %s, %s, %s, 'paid')"
                " ON CONFLICT (idempotency_key) DO NOTHING",
                ("po_" + new_id(), idempotency_key, payee, amount_minor, currency_code),
            )
            cursor = await conn.execute(
                "SELECT id, status, failure_reason FROM sandbox_payouts WHERE idempotency_key = %s",
                (idempotency_key,),
            )
            row = await cursor.fetchone()
        assert row is not None
        return PayoutResult(id=row[0], paid=row[1] == "paid", failure_reason=row[2])
