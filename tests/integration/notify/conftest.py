"""Fixtures: the real identity service and notify (in-process) per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from tests.integration.identity.harness import Identity, running_identity
from tests.integration.notify.harness import Notify, running_notify


@pytest.fixture
async def identity(database_url: str, redis_url: str) -> AsyncIterator[Identity]:
    async with running_identity(database_url, redis_url) as running:
        yield running


@pytest.fixture
def start_notify(
    database_url: str, redis_url: str, identity: Identity
) -> Callable[..., AbstractAsyncContextManager[Notify]]:
    """``async with start_notify(**settings) as notify``; several may run at once."""

    def start(**overrides: Any) -> AbstractAsyncContextManager[Notify]:
        return running_notify(database_url, redis_url, identity, **overrides)

    return start


@pytest.fixture
async def notify(
    start_notify: Callable[..., AbstractAsyncContextManager[Notify]],
) -> AsyncIterator[Notify]:
    async with start_notify() as running:
        yield running
