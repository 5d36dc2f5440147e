"""Payments' background worker: the things no request drives to the end by itself.

Each round (every ``worker_interval_s``):

* pays pending payouts through the processor (PENDING -> PAID or FAILED);
* reconciles reserved seats and pending tips whose request stopped before an outcome (a
  crash, or an answer lost twice), from the processor's records: booked, or dropped;
* resumes refunds left REFUND_PENDING, and the mass refund of canceled Spaces that
  still have valid tickets (a crash in the middle of one, a purchase that landed late);
* forgets idempotency keys past their retention, and old processed-event records;
* re-checks the ledger (every ``ledger_check_interval_s``) and publishes the result as a
  gauge.

Every step is idempotent, so several replicas may run it at once: the conditional updates
in the store decide who books what.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable

from services.common.errors import ServiceError
from services.payments import metrics
from services.payments.flows import Payments
from services.payments.processor import ProcessorError

logger = logging.getLogger(__name__)

__all__ = ["PaymentsWorker"]

_BATCH = 100
# Rooms' events are redelivered within minutes (pending claims), never after weeks.
_PROCESSED_EVENT_RETENTION = dt.timedelta(days=30)


class PaymentsWorker:
    """Runs :meth:`run_once` periodically in a background task.

    :param payments: the use cases.
    :param interval_s: pause between rounds.
    :param reservation_timeout_s: age at which a reserved seat is reconciled.
    :param retention_s: how long idempotency keys are kept.
    :param refund_batch: tickets per mass-refund batch.
    :param ledger_check_interval_s: least time between two full ledger checks.
    """

    def __init__(
        self,
        payments: Payments,
        *,
        interval_s: float,
        reservation_timeout_s: float,
        retention_s: float,
        refund_batch: int,
        ledger_check_interval_s: float = 60.0,
    ) -> None:
        self._payments = payments
        self._store = payments.store
        self._interval_s = interval_s
        self._reservation_timeout = dt.timedelta(seconds=reservation_timeout_s)
        self._retention = dt.timedelta(seconds=retention_s)
        self._refund_batch = refund_batch
        self._ledger_check_interval_s = ledger_check_interval_s
        self._next_ledger_check = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="payments worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("payments worker round failed")
            await asyncio.sleep(self._interval_s)

    async def run_once(self) -> None:
        """One round of every job (tests call it directly)."""
        now = dt.datetime.now(dt.UTC)
        for payout in await self._store.pending_payouts(_BATCH):
            await self._guard("payout", self._payments.pay_out(payout))
        for ticket in await self._store.stale_reservations(now - self._reservation_timeout, _BATCH):
            await self._guard("reservation", self._payments.sweep_reservation(ticket))
        for tip in await self._store.stale_tips(now - self._reservation_timeout, _BATCH):
            await self._guard("tip", self._payments.sweep_tip(tip))
        for ticket in await self._store.pending_refunds(_BATCH):
            await self._guard("refund", self._payments.resume_refund(ticket))
        for space_id in await self._store.canceled_with_tickets(_BATCH):
            await self._guard(
                "mass refund", self._payments.refund_all(space_id, self._refund_batch)
            )
        await self._store.delete_expired_requests(now - self._retention)
        await self._store.forget_processed_events(now - _PROCESSED_EVENT_RETENTION)
        if time.monotonic() >= self._next_ledger_check:
            await self.check_ledger()

    async def check_ledger(self) -> None:
        """Re-prove the ledger and publish the outcome as a gauge."""
        self._next_ledger_check = time.monotonic() + self._ledger_check_interval_s
        report = await self._store.check_books()
        metrics.LEDGER_IMBALANCE.set(report.problems)
        if not report.balanced:
            logger.error("the ledger check found problems: %s", report)

    @staticmethod
    async def _guard(job: str, work: Awaitable[object]) -> None:
        try:
            await work
        except (ServiceError, ProcessorError) as error:
            # Transient (processor or balance): the next round tries again.
            logger.warning("%s job failed: %r", job, error)
