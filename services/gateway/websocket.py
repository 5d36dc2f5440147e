"""Server-streaming RPCs with a GET rule, served as WebSockets at their route.

Each response message goes out as one JSON text frame. When the call fails, a last frame
``{"error": <google.rpc.Status>}`` precedes the close, whose code is 4000 + the HTTP status
grpc-gateway would give (4404, 4401...), so scripts may switch on the code alone; a stream
that ends normally closes with 1000. Resuming is the RPC's business: the client reconnects
with the last ``resume_token`` as a query parameter, which binds like any other.

Browsers cannot set headers on a WebSocket, so the bearer token may also come as the
``access_token`` query parameter or in ``Sec-WebSocket-Protocol`` as the pair
``bearer, <token>`` (the server then selects ``bearer``; the token is never echoed). The
token is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import grpc
import grpc.aio
from google.protobuf.message import Message
from google.rpc import status_pb2
from opentelemetry import propagate, trace
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from services.common import context
from services.gateway.calls import CallOptions, bearer_token, request_id_of
from services.gateway.errors import (
    GatewayError,
    http_status_of,
    status_from_rpc_error,
    status_json,
)
from services.gateway.marshal import message_json
from services.gateway.metrics import HTTP_REQUESTS, UNMATCHED_ROUTE, WEBSOCKET_STREAMS
from services.gateway.ratelimit import RateLimitGate
from services.gateway.transcoder.planner import CallPlanner, PlannedCall

logger = logging.getLogger(__name__)

__all__ = ["BEARER_SUBPROTOCOL", "WebSocketStreamer", "close_code_of", "websocket_token"]

_TRACER = trace.get_tracer(__name__)
BEARER_SUBPROTOCOL = "bearer"
ACCESS_TOKEN_PARAMETER = "access_token"
_CLOSE_REASON_BYTES = 120  # close frames allow 123 bytes of reason


def close_code_of(http_status: int) -> int:
    """The close code of a failed stream: 4000 + its HTTP status."""
    return 4000 + http_status


def websocket_token(websocket: WebSocket) -> tuple[str | None, str | None]:
    """``(token, subprotocol to select)`` from the header, query or subprotocols."""
    protocols = list(websocket.scope.get("subprotocols") or [])
    selected = BEARER_SUBPROTOCOL if BEARER_SUBPROTOCOL in protocols else None
    token = bearer_token(websocket.headers.get("authorization"))
    if token is None:
        token = websocket.query_params.get(ACCESS_TOKEN_PARAMETER) or None
    if token is None and selected is not None:
        index = protocols.index(BEARER_SUBPROTOCOL)
        if index + 1 < len(protocols):
            token = protocols[index + 1]
    return token, selected


class WebSocketStreamer:
    """Serves WebSocket upgrades on streaming routes.

    :param planner: matches routes and binds requests.
    :param gate: the rate limit.
    :param stream_timeout_s: deadline of a stream (None: as long as the client stays).
    """

    def __init__(
        self, planner: CallPlanner, gate: RateLimitGate, *, stream_timeout_s: float | None
    ) -> None:
        self._planner = planner
        self._gate = gate
        self._stream_timeout_s = stream_timeout_s

    async def serve(self, websocket: WebSocket) -> None:
        """Handle one WebSocket from upgrade to close."""
        token, subprotocol = websocket_token(websocket)
        await websocket.accept(subprotocol=subprotocol)
        route_label = UNMATCHED_ROUTE
        try:
            raw_path = websocket.scope.get("raw_path") or websocket.scope["path"].encode()
            match = self._planner.match("GET", raw_path.decode("latin-1").partition("?")[0])
            route_label = match.route.template.text
            if not match.route.server_streaming:
                raise GatewayError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "this route is not a stream; call it over plain HTTP",
                    reason="NOT_A_STREAM",
                )
            client = websocket.client
            await self._gate.admit(token, client.host if client else "unknown")
            options = CallOptions.from_headers(
                websocket.headers,
                request_id=request_id_of(websocket.headers.get("x-request-id")),
                default_timeout_s=self._stream_timeout_s,
                token=token,
            )
            planned = await self._planner.plan(
                match, websocket.query_params.multi_items(), b"", options
            )
        except GatewayError as error:
            HTTP_REQUESTS.labels(route_label, "GET", str(error.http_status)).inc()
            await _close_with_status(websocket, error.status, error.http_status)
            return
        HTTP_REQUESTS.labels(route_label, "GET", "101").inc()
        WEBSOCKET_STREAMS.labels(route_label).inc()
        # One server span for the whole session, its request id bound for the logs.
        with (
            context.bind_call(request_id=planned.options.request_id, timeout=None),
            _TRACER.start_as_current_span(
                f"WebSocket {route_label}",
                context=propagate.extract(dict(websocket.headers)),
                kind=trace.SpanKind.SERVER,
                attributes={"http.route": route_label},
            ),
        ):
            await self._stream(websocket, planned)

    async def _stream(self, websocket: WebSocket, planned: PlannedCall) -> None:
        call = self._planner.backend.stream(
            planned.route.method,
            planned.request,
            address=planned.address,
            metadata=planned.options.metadata(),
            timeout=planned.options.timeout_s,
        )
        pump = asyncio.create_task(self._pump(websocket, call, planned.route.response_body))
        watch = asyncio.create_task(_until_disconnected(websocket))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            call.cancel()
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)

    async def _pump(
        self,
        websocket: WebSocket,
        call: grpc.aio.UnaryStreamCall[Message, Message],
        response_body: str,
    ) -> None:
        try:
            async for message in call:
                await websocket.send_text(message_json(message, response_body))
        except grpc.RpcError as error:
            status = status_from_rpc_error(error)
            await _close_with_status(websocket, status, http_status_of(status.code))
            return
        except (WebSocketDisconnect, RuntimeError):
            return  # the client left while we were sending
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(1000)


async def _until_disconnected(websocket: WebSocket) -> None:
    # Client frames carry nothing the stream needs; read them only to notice the close.
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _close_with_status(
    websocket: WebSocket, status: status_pb2.Status, http_status: int
) -> None:
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    frame = json.dumps({"error": status_json(status)}, separators=(",", ":"))
    reason = status.message.encode()[:_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.send_text(frame)
        await websocket.close(close_code_of(http_status), reason)
