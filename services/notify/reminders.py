"""The reminder loop: sends SPACE_REMINDER notifications when they fall due.

Reminders live in PostgreSQL (``reminders``), so they survive restarts; any replica's loop
claims due ones with ``FOR UPDATE SKIP LOCKED`` and marks them sent in the transaction that
creates their notifications, so each fires exactly once even with many replicas. The loop
sleeps until the next fire time but never longer than ``poll_s``, which bounds lateness and
picks up reminders other replicas scheduled meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.notify import metrics
from services.notify.live import LiveHub
from services.notify.store import PostgresNotifyStore

logger = logging.getLogger(__name__)

__all__ = ["ReminderWorker"]

# How often the "due but not fired" gauge is refreshed.
_GAUGE_INTERVAL_S = 5.0


class ReminderWorker:
    """Fires due reminders until cancelled.

    :param store: storage.
    :param hub: live delivery.
    :param poll_s: longest sleep between looks.
    :param batch_size: reminders claimed per transaction.
    """

    def __init__(
        self,
        store: PostgresNotifyStore,
        hub: LiveHub,
        *,
        poll_s: float = 0.2,
        batch_size: int = 500,
    ) -> None:
        self._store = store
        self._hub = hub
        self._poll_s = poll_s
        self._batch_size = batch_size
        self._gauge_at = 0.0

    async def run(self) -> None:
        """Loop until cancelled, riding out database errors."""
        while True:
            try:
                # Also during a burst, so the "due, not fired" gauge shows the backlog.
                await self._refresh_gauge()
                if await self.fire_due() >= self._batch_size:
                    continue  # more are due: no sleep
                until_next = await self._store.seconds_to_next_reminder()
                delay = self._poll_s if until_next is None else min(self._poll_s, until_next)
                await asyncio.sleep(max(0.0, delay))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the reminder loop failed; retrying")
                await asyncio.sleep(self._poll_s)

    async def fire_due(self) -> int:
        """Send every reminder due now (one batch); return how many were claimed."""
        created, lateness = await self._store.fire_due_reminders(self._batch_size)
        if not lateness:
            return 0
        metrics.REMINDERS_FIRED.inc(len(lateness))
        metrics.NOTIFICATIONS_CREATED.labels("reminder").inc(len(created))
        for late in lateness:
            metrics.REMINDER_LATENESS.observe(max(0.0, late.total_seconds()))
        logger.info("sent %d reminders", len(lateness))
        try:
            await self._hub.publish_new(created)
        except Exception:
            logger.exception("publishing live reminders failed")
        return len(lateness)

    async def _refresh_gauge(self) -> None:
        if time.monotonic() < self._gauge_at:
            return
        self._gauge_at = time.monotonic() + _GAUGE_INTERVAL_S
        metrics.REMINDERS_DUE.set(await self._store.overdue_reminders())
