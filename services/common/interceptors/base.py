"""The shape every Spaces server interceptor shares: an async context manager around a call.

gRPC's aio ``ServerInterceptor`` hands back an ``RpcMethodHandler``; wrapping its behaviour
differs for each of the four RPC kinds, and for server streaming it differs again between
async-generator handlers and handlers that call ``context.write``. This module does that
wrapping once, so an interceptor only says what happens before and after a call by
implementing :meth:`ScopedServerInterceptor.scope`. The scope encloses the whole call,
including every message of a response stream, and runs in the call's own task, so the
context variables it sets are seen by the servicer.
"""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

logger = logging.getLogger(__name__)

__all__ = ["INFRASTRUCTURE_SERVICES", "MethodName", "ScopedServerInterceptor", "ServerCall"]

# Services every server hosts for operators and tools rather than for product clients.
INFRASTRUCTURE_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

if TYPE_CHECKING:
    # The stubs make these generic; at run time the classes are not subscriptable.
    Context = grpc.aio.ServicerContext[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]]
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


@dataclass(frozen=True)
class MethodName:
    """A gRPC method path split into its parts.

    :ivar full: ``/spaces.rooms.v1.RoomsService/CreateSpace``.
    :ivar service: ``spaces.rooms.v1.RoomsService``.
    :ivar method: ``CreateSpace``.
    """

    full: str
    service: str
    method: str

    @classmethod
    def parse(cls, path: str | bytes) -> MethodName:
        """Split a method path as gRPC reports it (``/package.Service/Method``)."""
        text = path.decode() if isinstance(path, bytes) else path
        service, _, method = text.lstrip("/").rpartition("/")
        return cls(full=text, service=service, method=method)

    @property
    def qualified(self) -> str:
        """Name in the descriptor pool: ``spaces.rooms.v1.RoomsService.CreateSpace``."""
        return f"{self.service}.{self.method}"

    @property
    def is_infrastructure(self) -> bool:
        """True for health checking and reflection."""
        return self.service in INFRASTRUCTURE_SERVICES


@dataclass(frozen=True)
class ServerCall:
    """What an interceptor knows about the call it wraps.

    :ivar method: the method being called.
    :ivar context: the servicer context (use it to abort).
    :ivar metadata: invocation metadata, keys lower-case, the first value of each key.
    :ivar request: the request message; ``None`` when requests are streamed.
    :ivar response_streaming: whether the method streams responses.
    """

    method: MethodName
    context: Context
    metadata: Mapping[str, str | bytes]
    request: Any
    response_streaming: bool


def _metadata(context: Context) -> dict[str, str | bytes]:
    found: dict[str, str | bytes] = {}
    for key, value in context.invocation_metadata() or ():
        found.setdefault(key.lower(), value)
    return found


class ScopedServerInterceptor(_ServerInterceptor, abc.ABC):
    """Base class: wraps every RPC of every kind in :meth:`scope`."""

    @abc.abstractmethod
    def scope(self, call: ServerCall) -> AbstractAsyncContextManager[None]:
        """Return the context manager to run the call inside.

        Raising before it yields rejects the call; exceptions from the handler reach its
        exit, where they may be translated.
        """

    def applies_to(self, method: MethodName) -> bool:
        """Whether this interceptor wraps ``method`` at all (default: every method)."""
        return True

    def request_deserializer(
        self, deserializer: Callable[[bytes], Any] | None
    ) -> Callable[[bytes], Any] | None:
        """The deserializer a wrapped handler of a unary request uses (default: unchanged).

        gRPC parses the request before any interceptor's behaviour runs, and answers a parse
        failure with UNKNOWN itself; replacing the deserializer is the only way to see it.
        """
        return deserializer

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED
        method = MethodName.parse(handler_call_details.method)
        if not self.applies_to(method):
            return handler
        return self._wrap(handler, method)

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: MethodName
    ) -> grpc.RpcMethodHandler[Any, Any]:
        deserializer = handler.request_deserializer
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, request_streaming=False),
                request_deserializer=self.request_deserializer(deserializer),
                response_serializer=serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, request_streaming=True),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, request_streaming=False),
                request_deserializer=self.request_deserializer(deserializer),
                response_serializer=serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method, request_streaming=True),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        return handler

    def _call(
        self, method: MethodName, request: Any, context: Context, *, streaming: bool
    ) -> ServerCall:
        return ServerCall(
            method=method,
            context=context,
            metadata=_metadata(context),
            request=request,
            response_streaming=streaming,
        )

    def _wrap_unary(
        self, behavior: Callable[..., Any], method: MethodName, *, request_streaming: bool
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def unary(request: Any, context: Context) -> Any:
            message = None if request_streaming else request
            async with self.scope(self._call(method, message, context, streaming=False)):
                return await behavior(request, context)

        return unary

    def _wrap_stream(
        self, behavior: Callable[..., Any], method: MethodName, *, request_streaming: bool
    ) -> Callable[[Any, Context], Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A handler that writes with ``context.write`` (like health's Watch) must stay a
            # coroutine function: gRPC tells the two styles apart by the function's kind.
            async def writer(request: Any, context: Context) -> None:
                message = None if request_streaming else request
                async with self.scope(self._call(method, message, context, streaming=True)):
                    await behavior(request, context)

            return writer

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            message = None if request_streaming else request
            async with self.scope(self._call(method, message, context, streaming=True)):
                async for response in behavior(request, context):
                    yield response

        return generator
