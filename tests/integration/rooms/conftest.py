"""Fixtures: rooms with real identity, PostgreSQL and Valkey, and media/payments doubles."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.rooms.harness import RoomsHarness, running_rooms


@pytest.fixture
async def rooms(database_url: str, redis_url: str) -> AsyncIterator[RoomsHarness]:
    """Rooms with its default limits."""
    async with running_rooms(database_url, redis_url) as running:
        yield running
