"""Binds the request id and the deadline of each call into :mod:`services.common.context`."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from services.common import context
from services.common.interceptors.base import ScopedServerInterceptor, ServerCall

logger = logging.getLogger(__name__)

__all__ = ["REQUEST_ID_HEADER", "RequestContextInterceptor"]

REQUEST_ID_HEADER = "x-request-id"
# Ids from callers end up in logs and in other services' metadata: accept only short,
# printable tokens and mint a fresh id for anything else.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# gRPC reports "no deadline" as a huge number of seconds rather than None.
_NO_DEADLINE_S = 365 * 24 * 3600.0


class RequestContextInterceptor(ScopedServerInterceptor):
    """Takes ``x-request-id`` from the caller (or makes one) and records the deadline."""

    def scope(self, call: ServerCall) -> AbstractAsyncContextManager[None]:
        return self._bind(call)

    @asynccontextmanager
    async def _bind(self, call: ServerCall) -> AsyncIterator[None]:
        given = call.metadata.get(REQUEST_ID_HEADER)
        if isinstance(given, str) and _VALID_REQUEST_ID.match(given):
            request_id = given
        else:
            request_id = context.new_request_id()
        remaining = call.context.time_remaining()
        timeout = remaining if remaining is not None and remaining < _NO_DEADLINE_S else None
        with context.bind_call(request_id=request_id, timeout=timeout):
            yield
