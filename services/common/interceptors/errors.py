"""Turns what a handler raises into a gRPC status with ``google.rpc`` details.

* :class:`~services.common.errors.ServiceError`: its own code, message and details.
* An abort by the handler itself: passes through untouched.
* A failed call to another service that the handler did not handle: UNAVAILABLE and
  DEADLINE_EXCEEDED keep their meaning (the caller may retry); anything else is our bug.
* Anything else: INTERNAL with a generic message. The exception text may hold internals or
  user data, so it goes to the log (with traceback, request id and trace id), never to the
  caller, who gets the request id to quote instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import grpc
import grpc.aio
import psycopg
import psycopg_pool
from grpc_status import rpc_status

from services.common import context
from services.common.errors import (
    DeadlineExceeded,
    Internal,
    ServiceError,
    Unavailable,
    to_rpc_status,
)
from services.common.interceptors.base import ScopedServerInterceptor, ServerCall

logger = logging.getLogger(__name__)

__all__ = ["ErrorInterceptor"]

_SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class ErrorInterceptor(ScopedServerInterceptor):
    """Maps exceptions to statuses.

    :param domain: ErrorInfo domain of this service, ``spaces.<service>``.
    """

    def __init__(self, domain: str) -> None:
        self._domain = domain

    def scope(self, call: ServerCall) -> AbstractAsyncContextManager[None]:
        return self._translate(call)

    @asynccontextmanager
    async def _translate(self, call: ServerCall) -> AsyncIterator[None]:
        try:
            yield
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except ServiceError as error:
            self._log_service_error(call, error)
            await self._abort(call, error)
        except grpc.aio.AioRpcError as error:
            await self._abort(call, self._downstream(call, error))
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as error:
            # The database went away (restart, failover, network): transient for the caller.
            logger.warning("%s failed: the database is unreachable: %s", call.method.full, error)
            await self._abort(call, database_unavailable())
        except Exception:
            logger.exception("unhandled exception in %s", call.method.full)
            await self._abort(call, _internal())

    async def _abort(self, call: ServerCall, error: ServiceError) -> None:
        status = rpc_status.to_status(to_rpc_status(error, self._domain))
        # abort() with the fields of the status is what abort_with_status() does; calling
        # abort() itself lets the tracing wrapper of the context record the code on the span.
        await call.context.abort(status.code, status.details, status.trailing_metadata)

    def _downstream(self, call: ServerCall, error: grpc.aio.AioRpcError) -> ServiceError:
        code = error.code()
        if code in _TRANSIENT:
            logger.warning("%s failed: a dependency answered %s", call.method.full, code.name)
            if code is grpc.StatusCode.UNAVAILABLE:
                return Unavailable("a dependency is unavailable", reason="DEPENDENCY_UNAVAILABLE")
            return DeadlineExceeded("a dependency did not answer in time")
        logger.error(
            "%s failed: unhandled %s from a dependency: %s",
            call.method.full,
            code.name,
            error.details(),
        )
        return _internal()

    @staticmethod
    def _log_service_error(call: ServerCall, error: ServiceError) -> None:
        if error.code in _SERVER_FAULTS:
            logger.error("%s failed: %r", call.method.full, error, exc_info=error)
        elif error.code in _TRANSIENT:
            logger.warning("%s failed: %r", call.method.full, error)
        else:
            logger.debug("%s refused: %r", call.method.full, error)


def database_unavailable() -> ServiceError:
    """UNAVAILABLE for a call the database could not serve; retrying later is safe."""
    return Unavailable(
        "the database is unreachable; retry later", reason="DATABASE_UNAVAILABLE", retry_after=1.0
    )


def _internal() -> ServiceError:
    request_id = context.current_request_id() or ""
    return Internal(
        f"internal error (request id {request_id})" if request_id else "internal error",
        metadata={"request_id": request_id} if request_id else None,
    )
