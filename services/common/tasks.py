"""Background-task helpers: loops that survive errors but never survive a cancel.

Client libraries sometimes turn the ``CancelledError`` delivered during a blocking read
into their own error (redis-py can surface a cancelled ``XREAD`` as a connection error).
A ``while True: try: ... except Exception: retry`` loop then swallows the cancel and runs
forever, and whoever awaits the cancelled task hangs. :func:`reraise_if_cancelling` in the
``except`` branch, and :func:`stop_tasks` on the stopping side, close that hole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)

__all__ = ["RECANCEL_INTERVAL_S", "reraise_if_cancelling", "stop_tasks"]

#: How often :func:`stop_tasks` repeats a cancel that a task swallowed.
RECANCEL_INTERVAL_S = 0.5


def reraise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop.

    Call it first in an ``except Exception`` branch of a retry loop: a cancel request
    that a library turned into another exception is still counted by the task.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError


async def stop_tasks(tasks: Iterable[asyncio.Task[object]], timeout_s: float = 5.0) -> None:
    """Cancel ``tasks`` and wait until they end, at most ``timeout_s``.

    A task may swallow a cancel (inside a library) and carry on; it is cancelled again
    every :data:`RECANCEL_INTERVAL_S` until it ends. One that has not ended by the deadline
    is logged and left behind rather than hanging the shutdown of the whole process.
    """
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_INTERVAL_S, remaining))
    for task in pending:
        logger.warning("task %s did not stop within %.1f s", task.get_name(), timeout_s)
