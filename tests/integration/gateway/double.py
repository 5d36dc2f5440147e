"""A gRPC backend double that accepts any method of the Spaces API.

It records every call (method, request, metadata, time remaining) and answers with what a
per-method behaviour returns; by default an empty response of the method's output type
(unary) or nothing (streams). Behaviours may abort with any status and details.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    # The stubs make it generic; at run time the class is not subscriptable.
    _GenericRpcHandler = grpc.GenericRpcHandler[Any, Any]
else:
    _GenericRpcHandler = grpc.GenericRpcHandler

UnaryBehaviour = Callable[[Message, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]
StreamBehaviour = Callable[[Message, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Message]]


@dataclass
class RecordedCall:
    method: str  # /pkg.Service/Method
    request: Message
    metadata: dict[str, str]
    time_remaining: float | None
    at: float = field(default_factory=time.monotonic)


def _method(path: str) -> Any:
    service, _, name = path.lstrip("/").rpartition("/")
    return descriptor_pool.Default().FindMethodByName(f"{service}.{name}")


class EchoBackend(_GenericRpcHandler):
    """Handles every method of the default pool."""

    def __init__(self) -> None:
        self.calls: list[RecordedCall] = []
        self.unary: dict[str, UnaryBehaviour] = {}
        self.streams: dict[str, StreamBehaviour] = {}

    def last(self) -> RecordedCall:
        return self.calls[-1]

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        path = handler_call_details.method
        try:
            method = _method(path)
        except KeyError:
            return None
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)

        def record(request: Message, context: Any) -> None:
            remaining = context.time_remaining()
            self.calls.append(
                RecordedCall(
                    path,
                    request,
                    {k: v for k, v in context.invocation_metadata() if isinstance(v, str)},
                    remaining if remaining is not None and remaining < 1e6 else None,
                )
            )

        if method.server_streaming:

            async def stream(request: Message, context: Any) -> AsyncIterator[Message]:
                record(request, context)
                behaviour = self.streams.get(path)
                if behaviour is not None:
                    async for message in behaviour(request, context):
                        yield message

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString,
            )

        async def unary(request: Message, context: Any) -> Message:
            record(request, context)
            behaviour = self.unary.get(path)
            if behaviour is not None:
                return await behaviour(request, context)
            return response_class()

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )


async def abort(context: Any, status: status_pb2.Status) -> None:
    """Abort the call with ``status`` (details travel in grpc-status-details-bin)."""
    await context.abort_with_status(rpc_status.to_status(status))


async def start_double() -> tuple[grpc.aio.Server, EchoBackend, int]:
    server = grpc.aio.server()
    backend = EchoBackend()
    server.add_generic_rpc_handlers((backend,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, backend, port
