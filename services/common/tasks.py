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

__all__ = ["reraise_if_cancelling", "stop_tasks"]


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

    A task that has not ended by then is logged and left behind rather than hanging the
    shutdown of the whole process.
    """
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    if not pending:
        return
    done, still_running = await asyncio.wait(pending, timeout=timeout_s)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            logger.debug("task %s ended with an error while stopping", task.get_name())
    for task in still_running:
        logger.warning("task %s did not stop within %.1f s", task.get_name(), timeout_s)
