"""Retention: old notifications, finished deliveries, dedupe rows and finished work go.

Every replica runs a :class:`RetentionWorker`; a run takes a PostgreSQL advisory lock, so
one replica purges at a time (the others skip that round). Each table is purged in bounded
steps of short transactions, so a purge never holds locks for long or scans a whole table:

* ``notifications`` older than ``NOTIFY_RETENTION_NOTIFICATIONS`` (90 days), walking the id
  index (ids grow with time) until it meets newer rows;
* ``deliveries`` that succeeded or were dead-lettered, older than
  ``NOTIFY_RETENTION_DELIVERIES`` (14 days; ListWebhookDeliveries shows 7), the same way;
* ``processed_events`` (the exactly-once record of consumed events) older than
  ``NOTIFY_RETENTION_PROCESSED_EVENTS`` (7 days), which must exceed how long an event can
  still be delivered again (the event streams' retention);
* fan-out jobs and reminders finished more than ``NOTIFY_RETENTION_FINISHED_WORK`` (30 days)
  ago.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

from services.notify import metrics
from services.notify.store import RetentionStore

logger = logging.getLogger(__name__)

__all__ = ["RetentionPolicy", "RetentionWorker"]


class RetentionPolicy:
    """How long each kind of row is kept.

    :param notifications: inbox entries.
    :param deliveries: finished webhook and push deliveries.
    :param processed_events: event ids kept for de-duplication.
    :param finished_work: finished fan-out jobs, sent or canceled reminders.
    """

    def __init__(
        self,
        *,
        notifications: dt.timedelta,
        deliveries: dt.timedelta,
        processed_events: dt.timedelta,
        finished_work: dt.timedelta,
    ) -> None:
        self.notifications = notifications
        self.deliveries = deliveries
        self.processed_events = processed_events
        self.finished_work = finished_work


class RetentionWorker:
    """Purges expired rows every ``interval_s`` until cancelled.

    :param store: the purge statements.
    :param policy: what is kept how long.
    :param interval_s: time between runs (the first run comes one interval after start-up,
        so a fleet restarting together does not purge at once).
    :param step_size: rows per delete step.
    """

    def __init__(
        self,
        store: RetentionStore,
        policy: RetentionPolicy,
        *,
        interval_s: float,
        step_size: int,
    ) -> None:
        self._store = store
        self._policy = policy
        self._interval_s = interval_s
        self._step_size = step_size

    async def run(self) -> None:
        """Purge on schedule, riding out database errors."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the retention purge failed; trying again next round")

    async def run_once(self, now: dt.datetime | None = None) -> dict[str, int] | None:
        """Purge everything expired at ``now`` (default: the current time).

        :return: rows deleted per table, or ``None`` when another replica was purging.
        """
        now = now or dt.datetime.now(dt.UTC)
        policy, step = self._policy, self._step_size
        async with self._store.exclusive() as acquired:
            if not acquired:
                logger.info("another replica is purging; skipping this round")
                return None
            started = time.perf_counter()
            purged = {
                "notifications": await self._store.purge_by_id(
                    "notifications", now - policy.notifications, step
                ),
                "deliveries": await self._store.purge_by_id(
                    "deliveries", now - policy.deliveries, step
                ),
                "processed_events": await self._store.purge_processed_events(
                    now - policy.processed_events, step
                ),
                "fanout_jobs": await self._store.purge_finished_fanouts(
                    now - policy.finished_work, step
                ),
                "reminders": await self._store.purge_finished_reminders(
                    now - policy.finished_work, step
                ),
            }
        for table, count in purged.items():
            metrics.RETENTION_PURGED.labels(table).inc(count)
        metrics.RETENTION_RUN_SECONDS.observe(time.perf_counter() - started)
        metrics.RETENTION_LAST_SUCCESS.set(time.time())
        logger.info("retention purge: %s", purged)
        return purged
