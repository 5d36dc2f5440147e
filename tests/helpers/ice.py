"""Test apps (aiortc peers in the test process) gather ICE candidates on loopback only.

aioice skips 127.0.0.1 when it lists the host's addresses; tests talk to media over
loopback and nothing else. Import the fixture into a test module or conftest::

    from tests.helpers.ice import loopback_ice  # noqa: F401  (an autouse fixture)
"""

from __future__ import annotations

import aioice.ice
import pytest


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gather host candidates on 127.0.0.1 only."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
