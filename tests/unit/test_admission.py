"""Admission control refuses at once past its bound and frees places when calls end."""

from __future__ import annotations

import asyncio

import pytest

from services.common.admission import Admission
from services.common.errors import ResourceExhausted


async def test_calls_past_the_bound_are_refused_at_once_with_a_retry_delay() -> None:
    gate = Admission(2, reason="JOINS_BUSY", subject="rooms replica", what="joins")
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.admit():
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.sleep(0)
    assert gate.in_progress == 2
    with pytest.raises(ResourceExhausted) as refused:
        async with gate.admit():
            pass
    assert refused.value.reason == "JOINS_BUSY"
    assert refused.value.retry_after is not None
    assert refused.value.quota_description == "2 joins at once"

    release.set()
    await asyncio.gather(*holders)
    assert gate.in_progress == 0
    async with gate.admit():
        assert gate.in_progress == 1, "a freed place is taken again"


async def test_a_failing_call_gives_its_place_back() -> None:
    gate = Admission(1, reason="BUSY", subject="node", what="calls")
    with pytest.raises(RuntimeError):
        async with gate.admit():
            raise RuntimeError("boom")
    assert gate.in_progress == 0
    with pytest.raises(ValueError):
        Admission(0, reason="BUSY", subject="node", what="calls")
