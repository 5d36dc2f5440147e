"""Prometheus metrics of rooms' Spaces and people (``spaces_rooms_`` prefix, no ids as labels).

The live event machinery has its own in :mod:`services.rooms.live.metrics`. The gauges here
count the whole deployment, not one replica: every replica reads them from PostgreSQL
every ``ROOMS_GAUGE_INTERVAL_S`` and reports the same values, so a dashboard takes
``max()`` across replicas (``sum()`` would count them once per replica).
"""

from __future__ import annotations

import logging

from prometheus_client import Gauge

from services.rooms.domain import Counts
from services.rooms.store import SpaceStore

logger = logging.getLogger(__name__)

__all__ = ["LIVE_SPACES", "PARTICIPANTS", "refresh_gauges"]

LIVE_SPACES = Gauge(
    "spaces_rooms_live_spaces",
    "Spaces live now, in the whole deployment (read from PostgreSQL; max() across replicas).",
)
PARTICIPANTS = Gauge(
    "spaces_rooms_participants",
    "People in live Spaces now, by role (host, co_host, speaker, listener), in the whole "
    "deployment (read from PostgreSQL; max() across replicas).",
    ["role"],
)
# Every role is exported from the start, so a dashboard never shows a missing series as 0.
_ROLES = ("host", "co_host", "speaker", "listener")
for _role in _ROLES:
    PARTICIPANTS.labels(_role)


def set_gauges(live_spaces: int, counts: Counts) -> None:
    """Publish what was read."""
    LIVE_SPACES.set(live_spaces)
    for role, value in zip(
        _ROLES, (counts.host, counts.co_host, counts.speaker, counts.listener), strict=True
    ):
        PARTICIPANTS.labels(role).set(value)


async def refresh_gauges(store: SpaceStore) -> None:
    """Read the live Spaces and their people by role, and publish them."""
    async with store.transaction() as tx:
        live_spaces, counts = await tx.live_totals()
    set_gauges(live_spaces, counts)
