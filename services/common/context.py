"""Per-call state carried in :mod:`contextvars`.

The server interceptors set these at the start of every RPC; code anywhere below a servicer
(domain logic, stores, outgoing clients, log formatters) reads them without threading
arguments through every call. Each RPC runs in its own asyncio task, so values never leak
between calls.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from services.common.auth import Principal
from services.common.errors import Unauthenticated

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "bind_call",
    "bind_principal",
    "current_principal",
    "current_request_id",
    "current_token",
    "deadline",
    "new_request_id",
    "optional_principal",
    "time_left_for_wait",
    "time_remaining",
]

_principal: ContextVar[Principal | None] = ContextVar("spaces_principal", default=None)
_token: ContextVar[str | None] = ContextVar("spaces_bearer_token", default=None)
_request_id: ContextVar[str | None] = ContextVar("spaces_request_id", default=None)
# Absolute deadline on the time.monotonic() clock; None when the caller set none.
_deadline: ContextVar[float | None] = ContextVar("spaces_deadline", default=None)


def new_request_id() -> str:
    """Return a fresh request id (32 lower-case hex digits)."""
    return uuid.uuid4().hex


def current_principal() -> Principal:
    """Return the authenticated caller of the current RPC.

    :raises Unauthenticated: when the call carried no (valid) token, e.g. in a public RPC.
    """
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("authentication required", reason="UNAUTHENTICATED")
    return principal


def optional_principal() -> Principal | None:
    """Return the caller of the current RPC, or ``None`` when it is anonymous."""
    return _principal.get()


def current_token() -> str | None:
    """Return the raw bearer token the current call was authenticated with, if any.

    Outgoing clients use it to forward a user's identity to another service.
    """
    return _token.get()


def current_request_id() -> str | None:
    """Return the request id of the current call (``x-request-id``), if any."""
    return _request_id.get()


def deadline() -> float | None:
    """Return the current call's deadline on the :func:`time.monotonic` clock, if any."""
    return _deadline.get()


def time_remaining() -> float | None:
    """Return the seconds left before the current call's deadline (never negative).

    ``None`` means no deadline applies (no current call, or the caller set none).
    """
    end = _deadline.get()
    if end is None:
        return None
    return max(0.0, end - time.monotonic())


WAIT_MARGIN_S = 0.25
"""What a call keeps of its deadline for its own answer when it waits on something."""


def time_left_for_wait(margin_s: float = WAIT_MARGIN_S) -> float | None:
    """How long the current call may wait on a dependency (a connection, another
    service) and still answer in time itself: the time remaining less a margin (at most a
    fifth of it). ``None`` when no deadline applies.

    Waiting the whole remaining time would leave the caller DEADLINE_EXCEEDED instead of
    the UNAVAILABLE it can retry.
    """
    remaining = time_remaining()
    if remaining is None:
        return None
    return max(0.001, remaining - min(margin_s, remaining * 0.2))


@contextmanager
def bind_call(*, request_id: str | None, timeout: float | None) -> Iterator[None]:
    """Set the request id and deadline for the duration of a ``with`` block.

    :param request_id: the request id (``x-request-id``).
    :param timeout: seconds from now until the deadline; ``None`` for no deadline.
    """
    end = None if timeout is None else time.monotonic() + timeout
    with _bound(_request_id, request_id), _bound(_deadline, end):
        yield


@contextmanager
def bind_principal(principal: Principal | None, token: str | None = None) -> Iterator[None]:
    """Set the caller (and the raw token it presented) for the duration of a ``with`` block.

    Background workers (event consumers) use it to act as a service the way an RPC would.
    """
    with _bound(_principal, principal), _bound(_token, token):
        yield


@contextmanager
def _bound(var: ContextVar[T], value: T) -> Iterator[None]:
    reset_token = var.set(value)
    try:
        yield
    finally:
        try:
            var.reset(reset_token)
        except ValueError:
            # An async generator closed from another task runs its finally clause in a
            # different Context; that task's state is not ours to restore.
            pass
