"""The gateway's ASGI application: the web client, the derived API routes and middleware.

Request flow (outermost first): metrics → CORS (when origins are configured) → request id
→ the catch-all API endpoint, which matches the path against the route table built from
the descriptors, applies the rate limit, and hands over to the HTTP transcoder (or, for
upgrade requests, the WebSocket streamer). Nothing here names an RPC: an annotated RPC
added to a proto is served once the descriptors are regenerated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import propagate, trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from services.common import context
from services.gateway.calls import REQUEST_ID_HEADER, CallOptions, request_id_of
from services.gateway.descriptors import ApiDescription, http_rule
from services.gateway.errors import GatewayError
from services.gateway.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS, UNMATCHED_ROUTE
from services.gateway.openapi import build_openapi
from services.gateway.ratelimit import RateLimitGate
from services.gateway.routing import PathTemplate, Route, RouteMatch, RouteTable, http_bindings
from services.gateway.transcoder.backend import Backend
from services.gateway.transcoder.http import HttpTranscoder
from services.gateway.transcoder.planner import CallPlanner
from services.gateway.web import INDEX_HEADERS, StaticSite
from services.gateway.websocket import WebSocketStreamer

logger = logging.getLogger(__name__)

__all__ = ["GatewayConfig", "build_route_table", "create_app"]

_TRACER = trace.get_tracer(__name__)
_API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_ANY_METHOD = [*_API_METHODS, "HEAD", "OPTIONS", "TRACE", "CONNECT"]


def build_route_table(api: ApiDescription) -> RouteTable:
    """One route per HTTP binding of every RPC that has a ``google.api.http`` rule."""
    routes: list[Route] = []
    for service in api.services:
        for method in service.methods:
            rule = http_rule(method)
            if rule is None:
                continue  # ACCESS_INTERNAL: never routable
            for verb, template, body in http_bindings(rule):
                routes.append(
                    Route(verb, PathTemplate.parse(template), body, rule.response_body, method)
                )
    return RouteTable(routes)


@dataclass(frozen=True)
class GatewayConfig:
    """Knobs of the application (from :class:`GatewaySettings`, or set by tests)."""

    default_timeout_s: float = 10.0
    stream_timeout_s: float | None = None
    max_body_bytes: int = 1024 * 1024
    cors_allowed_origins: Sequence[str] = field(default_factory=tuple)
    web_root: Path | None = None  # the web client's folder; None: services/gateway/web/client


class _RequestIdMiddleware:
    """Takes or mints ``X-Request-Id``, binds it for logs, and returns it on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given = None
        for key, value in scope.get("headers", []):
            if key == REQUEST_ID_HEADER.encode():
                given = value.decode("latin-1")
                break
        request_id = request_id_of(given)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        with context.bind_call(request_id=request_id, timeout=None):
            await self._app(scope, receive, send_with_id)


class _MetricsMiddleware:
    """Counts and times HTTP requests by route template (set by the endpoint)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        method = str(scope.get("method", "GET"))

        async def observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = str(state.get("route", UNMATCHED_ROUTE))
                HTTP_REQUESTS.labels(route, method, str(message["status"])).inc()
                HTTP_REQUEST_DURATION.labels(route, method).observe(time.perf_counter() - started)
            await send(message)

        await self._app(scope, receive, observe)


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _raw_path(scope: Scope) -> str:
    raw: bytes | None = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else str(scope["path"])
    return path.partition("?")[0]


def create_app(
    api: ApiDescription,
    backend: Backend,
    gate: RateLimitGate,
    config: GatewayConfig,
    *,
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
) -> Starlette:
    """Build the ASGI application.

    :param api: the services served.
    :param backend: channels to them.
    :param gate: the rate limit.
    :param config: timeouts, limits, CORS.
    :param on_shutdown: closers run when the application stops (after the backend's).
    """
    table = build_route_table(api)
    planner = CallPlanner(table, backend)
    transcoder = HttpTranscoder(planner, max_body_bytes=config.max_body_bytes)
    streamer = WebSocketStreamer(planner, gate, stream_timeout_s=config.stream_timeout_s)
    openapi_document = json.dumps(build_openapi(api, table), separators=(",", ":"))
    site = StaticSite(config.web_root) if config.web_root else StaticSite()

    async def healthz(request: Request) -> Response:
        request.state.route = "/healthz"
        return JSONResponse({"status": "ok"})

    async def index(request: Request) -> Response:
        request.state.route = "/"
        return await site.respond(request, "index.html", INDEX_HEADERS)

    async def web_file(request: Request) -> Response:
        request.state.route = "/web/{path}"
        return await site.respond(request, str(request.path_params["path"]))

    async def openapi(request: Request) -> Response:
        request.state.route = "/openapi.json"
        return Response(openapi_document, media_type="application/json")

    async def endpoint(request: Request) -> Response:
        try:
            match = planner.match(request.method, _raw_path(request.scope))
        except GatewayError as error:
            return error.response()
        template = match.route.template.text
        request.state.route = template
        # The server span of the request: backend calls (traced by the channel's
        # interceptors) become its children, and a caller's traceparent is honoured.
        with _TRACER.start_as_current_span(
            f"{request.method} {template}",
            context=propagate.extract(dict(request.headers)),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": template},
        ) as span:
            response = await call(request, match)
            span.set_attribute("http.response.status_code", response.status_code)
            return response

    async def call(request: Request, match: RouteMatch) -> Response:
        try:
            options = CallOptions.from_headers(
                request.headers,
                request_id=request.state.request_id,
                default_timeout_s=(
                    config.stream_timeout_s
                    if match.route.server_streaming
                    else config.default_timeout_s
                ),
            )
            await gate.admit(options.token, _client_ip(request))
            return await transcoder.handle(request, match, options)
        except GatewayError as error:
            return error.response()
        except Exception as error:  # a gateway bug: answered here, inside the middleware,
            # so the response still carries its request id and is counted.
            return await _internal_error(request, error)

    async def http_error(request: Request, error: Exception) -> Response:
        # Starlette's own refusals: a method outside its list (405) or a path its router
        # cannot parse (404, e.g. one with a newline). The route table gives the real
        # answer (404, or 405 with Allow), as a Status like everything else.
        try:
            planner.match(request.method, _raw_path(request.scope))
        except GatewayError as refusal:
            return refusal.response()
        return GatewayError(
            grpc.StatusCode.NOT_FOUND, "no such route", reason="ROUTE_NOT_FOUND"
        ).response()

    async def websocket_endpoint(websocket: WebSocket) -> None:
        await streamer.serve(websocket)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.close()
            for closer in on_shutdown:
                await closer()

    middleware = [Middleware(_MetricsMiddleware)]
    if config.cors_allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_allowed_origins),
                allow_methods=_API_METHODS,
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "Range",
                    "X-Request-Id",
                    "X-Request-Timeout",
                ],
                expose_headers=["Content-Range", "Retry-After", "X-Request-Id"],
                # Bearer tokens, not cookies: credentialed requests are never needed.
                allow_credentials=False,
                max_age=600,
            )
        )
    middleware.append(Middleware(_RequestIdMiddleware))
    routes = [
        StarletteRoute("/healthz", healthz, methods=["GET"]),
        StarletteRoute("/openapi.json", openapi, methods=["GET"]),
        # The web client (GET and HEAD): its page, then its files under /web/.
        StarletteRoute("/", index, methods=["GET"]),
        StarletteRoute("/web/{path:path}", web_file, methods=["GET"]),
        # Every method reaches the endpoint, which answers 405 with Allow for the ones no
        # route takes.
        StarletteRoute("/{path:path}", endpoint, methods=_ANY_METHOD),
        WebSocketRoute("/{path:path}", websocket_endpoint),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            Exception: _internal_error,
            HTTPException: http_error,
        },
    )


async def _internal_error(request: Request, error: Exception) -> Response:
    # A bug of the gateway: logged with its traceback, answered as a Status like the rest.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return GatewayError(
        grpc.StatusCode.INTERNAL, "internal error in the gateway", reason="INTERNAL"
    ).response()
