"""Retry loops must end when cancelled, even when a library disguises the cancel."""

from __future__ import annotations

import asyncio

from services.common.tasks import reraise_if_cancelling, stop_tasks


async def _disguising_read() -> None:
    """What redis-py can do: a cancel during a blocking read comes out as another error."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        raise ConnectionError("connection closed by server") from None


async def _retry_loop(guarded: list[bool], attempts: list[int]) -> None:
    while True:
        attempts.append(1)
        try:
            await _disguising_read()
        except Exception:
            if guarded[0]:
                reraise_if_cancelling()
            await asyncio.sleep(0)


async def test_a_guarded_loop_stops_on_cancel() -> None:
    attempts: list[int] = []
    task = asyncio.create_task(_retry_loop([True], attempts))
    await asyncio.sleep(0.01)
    await stop_tasks([task], timeout_s=1.0)
    assert task.cancelled()
    assert len(attempts) == 1


async def test_stop_tasks_gives_up_on_a_loop_that_swallows_cancels() -> None:
    attempts: list[int] = []
    guarded = [False]
    task = asyncio.create_task(_retry_loop(guarded, attempts))
    await asyncio.sleep(0.01)
    await stop_tasks([task], timeout_s=0.2)
    # The unguarded loop went round again instead of ending; stop_tasks did not hang.
    assert not task.done()
    assert len(attempts) >= 2
    guarded[0] = True
    await stop_tasks([task], timeout_s=1.0)
    assert task.cancelled()
