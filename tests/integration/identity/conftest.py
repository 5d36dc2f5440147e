"""Fixtures: a running identity service per test (fresh database and Redis index)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from tests.integration.identity.harness import Identity, running_identity


@pytest.fixture
async def identity(database_url: str, redis_url: str) -> AsyncIterator[Identity]:
    """Identity with its default policy."""
    async with running_identity(database_url, redis_url) as running:
        yield running


@pytest.fixture
def start_identity(
    database_url: str, redis_url: str
) -> Callable[..., AbstractAsyncContextManager[Identity]]:
    """Start identity with settings overridden (``async with start_identity(x=1) as i``);
    several may run at once on the same database and Redis, like replicas."""

    def start(**overrides: Any) -> AbstractAsyncContextManager[Identity]:
        return running_identity(database_url, redis_url, **overrides)

    return start
