"""Refuses product RPCs with UNAVAILABLE until the service's start-up hooks have finished.

The server starts listening before its start-up hooks run (migrations, pools, caches), so
health checks can report NOT_SERVING meanwhile instead of failing to connect. Calls that
arrive in that window get UNAVAILABLE, which clients' retry policies retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from services.common.errors import Unavailable
from services.common.interceptors.base import MethodName, ScopedServerInterceptor, ServerCall

logger = logging.getLogger(__name__)

__all__ = ["ReadinessInterceptor"]


class ReadinessInterceptor(ScopedServerInterceptor):
    """Gate opened by :meth:`set_ready`; health and reflection always pass."""

    def __init__(self) -> None:
        self._ready = asyncio.Event()

    def set_ready(self) -> None:
        """Let product RPCs through."""
        self._ready.set()

    @property
    def ready(self) -> bool:
        """Whether product RPCs are let through."""
        return self._ready.is_set()

    def applies_to(self, method: MethodName) -> bool:
        return not method.is_infrastructure

    def scope(self, call: ServerCall) -> AbstractAsyncContextManager[None]:
        return self._gate()

    @asynccontextmanager
    async def _gate(self) -> AsyncIterator[None]:
        if not self._ready.is_set():
            raise Unavailable("the service is starting", reason="STARTING", retry_after=1.0)
        yield
