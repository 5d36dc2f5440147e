"""Fixtures: a media engine on 127.0.0.1 and app peers that gather on loopback only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest

from services.media.config import MediaConfig
from services.media.engine import MediaEngine
from tests.helpers.ice import loopback_ice  # noqa: F401  (autouse)
from tests.integration.media.peers import App, Tone


@pytest.fixture
async def engine() -> AsyncIterator[MediaEngine]:
    """A started engine (egress on one worker thread, quick RTCP)."""
    async with MediaEngine(MediaConfig(rtcp_interval=0.5)) as running:
        yield running


AppFactory = Callable[..., App]


@pytest.fixture
async def apps() -> AsyncIterator[AppFactory]:
    """Make apps (``apps("alice", tone=Tone(440, 0.3))``), all closed after the test."""
    async with AsyncExitStack() as stack:

        def make(name: str, tone: Tone | None = None, slots: int = 3) -> App:
            app = App(name, tone, slots)
            stack.push_async_callback(app.close)
            return app

        yield make
