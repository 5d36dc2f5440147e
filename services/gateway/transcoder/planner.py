"""From a matched route and an HTTP request to a ready backend call (HTTP and WebSocket)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from services.gateway.binding import RequestBinder
from services.gateway.calls import CallOptions
from services.gateway.errors import GatewayError
from services.gateway.routing import Route, RouteMatch, RouteTable
from services.gateway.transcoder.backend import Backend

logger = logging.getLogger(__name__)

__all__ = ["CallPlanner", "PlannedCall"]


@dataclass(frozen=True)
class PlannedCall:
    """Everything a backend call needs.

    :ivar route: the route (and through it the RPC).
    :ivar request: the request message.
    :ivar options: token, request id, deadline.
    :ivar address: the backend's address.
    """

    route: Route
    request: Message
    options: CallOptions
    address: str


class CallPlanner:
    """Matches requests to routes and binds their request messages.

    :param table: the routes.
    :param backend: the backends (for addresses).
    """

    def __init__(self, table: RouteTable, backend: Backend) -> None:
        self.table = table
        self.backend = backend
        # Built once per route: resolving field paths is the slow part of binding.
        self._binders = {route: RequestBinder(route) for route in table.routes}

    def binder(self, route: Route) -> RequestBinder:
        """The binder of ``route``."""
        return self._binders[route]

    def match(self, http_method: str, raw_path: str) -> RouteMatch:
        """The route for the request.

        :raises GatewayError: 404 when no route has the path, 405 when another method does.
        """
        found = self.table.match(http_method, raw_path)
        if found is not None:
            return found
        allowed = self.table.allowed_methods(raw_path)
        if allowed:
            raise GatewayError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{http_method} is not allowed here; use {', '.join(allowed)}",
                reason="METHOD_NOT_ALLOWED",
                http_status=405,
                headers={"Allow": ", ".join(allowed)},
            )
        raise GatewayError(grpc.StatusCode.NOT_FOUND, "no such route", reason="ROUTE_NOT_FOUND")

    async def plan(
        self,
        match: RouteMatch,
        query: Iterable[tuple[str, str]],
        body: bytes,
        options: CallOptions,
        *,
        overrides: Mapping[str, str] | None = None,
    ) -> PlannedCall:
        """Bind the request and pick the backend.

        :param overrides: extra path-like bindings (the Range header's offset/length).
        """
        params = dict(match.path_params)
        request = self._binders[match.route].build(params, query, body)
        if overrides:
            for name, value in overrides.items():
                setattr(request, name, int(value))
        try:
            address = await self.backend.router.address(match.route.method, params)
        except LookupError as error:
            logger.error("no backend for %s: %s", match.route.method.full_name, error)
            raise GatewayError(
                grpc.StatusCode.UNIMPLEMENTED, "no backend serves this route", reason="NO_BACKEND"
            ) from None
        return PlannedCall(match.route, request, options, address)
