"""Admission control: a bound on work of one kind in progress at once in this process.

A burst (2,000 people joining one Space at the same second) must not queue behind itself
until every caller's deadline passes; past the bound, calls are refused at once with
``RESOURCE_EXHAUSTED`` and a retry delay (429 with ``Retry-After`` at the gateway), and
the admitted ones finish in time::

    joins = Admission(64, reason="JOINS_BUSY", subject="rooms replica", what="joins")
    async with joins.admit():
        ...
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.common.errors import ResourceExhausted

logger = logging.getLogger(__name__)

__all__ = ["Admission"]


class Admission:
    """Admits at most ``limit`` calls at once; refuses the rest without waiting.

    :param limit: calls in progress at once.
    :param reason: the ErrorInfo reason of a refusal.
    :param subject: what the limit applies to (QuotaFailure subject).
    :param what: the work, for messages ("joins").
    :param retry_after_s: the delay suggested to refused callers.
    """

    def __init__(
        self, limit: int, *, reason: str, subject: str, what: str, retry_after_s: float = 1.0
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.in_progress = 0
        self._reason = reason
        self._subject = subject
        self._what = what
        self._retry_after_s = retry_after_s

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one place for the block.

        :raises ResourceExhausted: when every place is taken.
        """
        if self.in_progress >= self.limit:
            raise ResourceExhausted(
                f"too many {self._what} in progress; retry in a moment",
                reason=self._reason,
                quota_subject=self._subject,
                quota_description=f"{self.limit} {self._what} at once",
                retry_after=self._retry_after_s,
            )
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1
