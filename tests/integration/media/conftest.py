"""Fixtures: a media engine on 127.0.0.1 and app peers that gather on loopback only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import aioice.ice
import pytest

from services.media.config import MediaConfig
from services.media.engine import MediaEngine
from tests.integration.media.peers import App, Tone


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice skips 127.0.0.1 when gathering; the test apps must use nothing else."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


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
