"""Coalescing of high-rate signals into few events per Space.

Reactions and speaking levels can arrive hundreds of times a second in a busy Space; each
watcher only needs a few updates a second. Each replica therefore aggregates them in
memory per Space and appends one event per window through the ordered log, so every
watcher still sees one total order. What a window holds is lost if the process dies
before it ends; both kinds are ephemeral, so that costs at most a quarter second of
reactions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from spaces.rooms.v1 import rooms_events_pb2, rooms_resources_pb2

from services.rooms.live.codec import utc_now

logger = logging.getLogger(__name__)

__all__ = ["ReactionCoalescer", "SpeakingLevelsCoalescer"]

Emit = Callable[[str, rooms_events_pb2.SpaceEvent], Awaitable[None]]
Build = Callable[[], rooms_events_pb2.SpaceEvent | None]


class _Flusher:
    """Runs one delayed flush per Space at a time and tracks the tasks doing it."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def schedule(self, space_id: str, delay_s: float, build: Build) -> None:
        if space_id in self._tasks:
            return
        self._tasks[space_id] = asyncio.create_task(
            self._later(space_id, delay_s, build), name=f"live coalesce {space_id}"
        )

    async def _later(self, space_id: str, delay_s: float, build: Build) -> None:
        try:
            await asyncio.sleep(delay_s)
        finally:
            # Removed before building, so a signal arriving during the append schedules
            # the next window instead of being folded into one already taken.
            self._tasks.pop(space_id, None)
        event = build()
        if event is not None:
            try:
                await self._emit(space_id, event)
            except Exception:
                logger.exception("appending a coalesced %s event failed", space_id)

    async def drain(self) -> None:
        """Flush every pending window now (shutdown)."""
        while self._tasks:
            tasks = list(self._tasks.values())
            await asyncio.gather(*tasks, return_exceptions=True)

    async def cancel(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()


class ReactionCoalescer:
    """Counts reactions per Space over a window and emits one ``reactions`` event per window.

    :param emit: appends an event to the Space's log.
    :param window_s: window length.
    """

    def __init__(self, emit: Emit, window_s: float) -> None:
        self._window_s = window_s
        self._flusher = _Flusher(emit)
        self._windows: dict[str, tuple[datetime, Counter[int]]] = {}

    def add(self, space_id: str, emoji: rooms_resources_pb2.Emoji.ValueType) -> None:
        """Count one reaction; the window it opens (if none is open) ends ``window_s`` later."""
        window = self._windows.get(space_id)
        if window is None:
            window = (utc_now(), Counter())
            self._windows[space_id] = window
        window[1][emoji] += 1
        self._flusher.schedule(space_id, self._window_s, lambda: self._close(space_id))

    def _close(self, space_id: str) -> rooms_events_pb2.SpaceEvent | None:
        window = self._windows.pop(space_id, None)
        if window is None:
            return None
        started, counts = window
        event = rooms_events_pb2.SpaceEvent()
        event.reactions.window_start_time.FromDatetime(started)
        event.reactions.window_duration.FromTimedelta(timedelta(seconds=self._window_s))
        for emoji, count in counts.most_common():
            event.reactions.counts.add(emoji=emoji, count=count)
        return event

    async def flush(self) -> None:
        """Emit every open window now."""
        await self._flusher.drain()


class SpeakingLevelsCoalescer:
    """Keeps the latest speaking levels per Space; emits at most one event per interval.

    The first report after a quiet interval goes out at once (leading edge); reports within
    the interval replace each other and the latest goes out when it ends (trailing edge).

    :param emit: appends an event to the Space's log.
    :param interval_s: least time between two events of one Space.
    """

    def __init__(self, emit: Emit, interval_s: float) -> None:
        self._interval_s = interval_s
        self._flusher = _Flusher(emit)
        self._latest: dict[str, list[rooms_resources_pb2.SpeakingLevel]] = {}
        self._last_sent: dict[str, float] = {}

    def add(self, space_id: str, levels: Sequence[rooms_resources_pb2.SpeakingLevel]) -> None:
        """Replace the Space's pending levels with ``levels``."""
        self._latest[space_id] = list(levels)
        if len(self._last_sent) > 4096:
            self._forget_quiet()
        wait = self._last_sent.get(space_id, 0.0) + self._interval_s - time.monotonic()
        self._flusher.schedule(space_id, max(0.0, wait), lambda: self._take(space_id))

    def _take(self, space_id: str) -> rooms_events_pb2.SpaceEvent | None:
        levels = self._latest.pop(space_id, None)
        if levels is None:
            return None
        self._last_sent[space_id] = time.monotonic()
        event = rooms_events_pb2.SpaceEvent()
        event.speaking_levels.levels.extend(levels)
        return event

    async def flush(self) -> None:
        """Emit every pending update now."""
        await self._flusher.drain()

    def _forget_quiet(self) -> None:
        # Spaces quiet for a whole interval need no memory of their last event.
        horizon = time.monotonic() - self._interval_s
        for space_id in [s for s, t in self._last_sent.items() if t < horizon]:
            del self._last_sent[space_id]

    def forget(self, space_id: str) -> None:
        """Drop what is known about a Space (it ended)."""
        self._latest.pop(space_id, None)
        self._last_sent.pop(space_id, None)
