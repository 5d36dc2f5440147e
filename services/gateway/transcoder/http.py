"""The HTTP side of transcoding: unary JSON, server streams as NDJSON, byte ranges.

* Unary RPCs answer the response message as JSON (200) or the error as a JSON
  ``google.rpc.Status`` with grpc-gateway's status code.
* Server-streaming RPCs over plain GET answer ``application/x-ndjson``: one JSON message per
  line. The first message is awaited before the status line goes out, so a call failing at
  once still gets its proper HTTP status; a failure later ends the body with an
  ``{"error": <Status>}`` line.
* Byte-streaming RPCs (:mod:`services.gateway.ranges`) answer the raw bytes with the file's
  content type, honouring ``Range``: 206 + ``Content-Range``, or 416 when unsatisfiable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.gateway.calls import CallOptions
from services.gateway.errors import (
    GatewayError,
    status_from_rpc_error,
    status_json,
    status_response,
)
from services.gateway.marshal import message_json
from services.gateway.ranges import DEFAULT_CONTENT_TYPE as DEFAULT_TYPE
from services.gateway.ranges import file_info, is_byte_stream, parse_range
from services.gateway.routing import RouteMatch
from services.gateway.transcoder.planner import CallPlanner, PlannedCall

logger = logging.getLogger(__name__)

__all__ = ["HttpTranscoder", "read_body"]

NDJSON = "application/x-ndjson"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"request body larger than {limit} bytes",
        reason="BODY_TOO_LARGE",
        http_status=413,
    )


class HttpTranscoder:
    """Serves a matched HTTP request.

    :param planner: binds requests and picks backends.
    :param max_body_bytes: the request size limit.
    """

    def __init__(self, planner: CallPlanner, *, max_body_bytes: int) -> None:
        self._planner = planner
        self._max_body_bytes = max_body_bytes

    async def handle(self, request: Request, match: RouteMatch, options: CallOptions) -> Response:
        """Call the route's RPC and answer."""
        route = match.route
        body = await read_body(request, self._max_body_bytes)
        query = request.query_params.multi_items()
        if route.server_streaming and is_byte_stream(route.method):
            return await self._byte_stream(request, match, query, body, options)
        planned = await self._planner.plan(match, query, body, options)
        if route.server_streaming:
            return await self._ndjson(planned)
        backend = self._planner.backend
        try:
            response, _ = await backend.unary(
                route.method,
                planned.request,
                address=planned.address,
                metadata=options.metadata(),
                timeout=options.timeout_s,
            )
        except grpc.RpcError as error:
            return status_response(status_from_rpc_error(error))
        return Response(message_json(response, route.response_body), media_type="application/json")

    def _start(self, planned: PlannedCall) -> grpc.aio.UnaryStreamCall[Message, Message]:
        return self._planner.backend.stream(
            planned.route.method,
            planned.request,
            address=planned.address,
            metadata=planned.options.metadata(),
            timeout=planned.options.timeout_s,
        )

    async def _ndjson(self, planned: PlannedCall) -> Response:
        call = self._start(planned)
        messages = aiter(call)
        try:
            first = await anext(messages)
        except StopAsyncIteration:
            return Response(b"", media_type=NDJSON)
        except grpc.RpcError as error:
            return status_response(status_from_rpc_error(error))
        response_body = planned.route.response_body

        async def lines() -> AsyncIterator[str]:
            try:
                yield message_json(first, response_body) + "\n"
                async for message in messages:
                    yield message_json(message, response_body) + "\n"
            except grpc.RpcError as error:
                status = status_json(status_from_rpc_error(error))
                yield json.dumps({"error": status}, separators=(",", ":")) + "\n"
            finally:
                # The client went away (Starlette cancels us) or the stream ended.
                call.cancel()

        return StreamingResponse(lines(), media_type=NDJSON)

    async def _byte_stream(
        self,
        request: Request,
        match: RouteMatch,
        query: list[tuple[str, str]],
        body: bytes,
        options: CallOptions,
    ) -> Response:
        wanted = parse_range(request.headers.get("range"))
        overrides: dict[str, str] = {}
        if wanted is not None and wanted.start is not None:
            overrides["offset"] = str(wanted.start)
            if wanted.end is not None:
                overrides["length"] = str(wanted.end - wanted.start + 1)
        elif wanted is not None:
            # A suffix range needs the size first: ask for one byte to learn it.
            size, failure = await self._size(match, query, body, options)
            if failure is not None:
                return failure
            resolved = wanted.resolve(size) if size is not None else None
            if resolved is None:
                return _unsatisfiable(size)
            overrides = {"offset": str(resolved[0]), "length": str(resolved[1] - resolved[0] + 1)}
        planned = await self._planner.plan(match, query, body, options, overrides=overrides)
        call = self._start(planned)
        messages = aiter(call)
        try:
            first = await anext(messages)
        except StopAsyncIteration:
            # No metadata at all: an empty file.
            if wanted is not None:
                return _unsatisfiable(0)
            return Response(b"", headers={"Accept-Ranges": "bytes"}, media_type=DEFAULT_TYPE)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.OUT_OF_RANGE and wanted is not None:
                return _unsatisfiable((await self._size(match, query, body, options))[0])
            return status_response(status_from_rpc_error(error))
        size, content_type = file_info(first)
        headers = {"Accept-Ranges": "bytes"}
        status_code = 200
        if wanted is not None:
            resolved = wanted.resolve(size)
            if resolved is None:
                call.cancel()
                return _unsatisfiable(size)
            first_byte, last_byte = resolved
            headers["Content-Range"] = f"bytes {first_byte}-{last_byte}/{size}"
            headers["Content-Length"] = str(last_byte - first_byte + 1)
            status_code = 206
        else:
            headers["Content-Length"] = str(size)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                if first.data:  # type: ignore[attr-defined]
                    yield bytes(first.data)  # type: ignore[attr-defined]
                async for message in messages:
                    yield bytes(message.data)  # type: ignore[attr-defined]
            except grpc.RpcError as error:
                # Headers are gone: all we can do is cut the body short, which the client
                # notices from Content-Length.
                logger.warning("byte stream failed mid-way: %s", error.code())
            finally:
                call.cancel()

        return StreamingResponse(
            chunks(), status_code=status_code, headers=headers, media_type=content_type
        )

    async def _size(
        self, match: RouteMatch, query: list[tuple[str, str]], body: bytes, options: CallOptions
    ) -> tuple[int | None, Response | None]:
        """The file's size from a one-byte read, or the error answer of that read."""
        planned = await self._planner.plan(
            match, query, body, options, overrides={"offset": "0", "length": "1"}
        )
        call = self._start(planned)
        try:
            first = await anext(aiter(call))
        except StopAsyncIteration:
            return None, None
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                return 0, None  # even byte 0 is out of range: the file is empty
            return None, status_response(status_from_rpc_error(error))
        finally:
            call.cancel()
        return file_info(first)[0], None


def _unsatisfiable(size: int | None) -> Response:
    error = GatewayError(
        grpc.StatusCode.OUT_OF_RANGE,
        "the requested range is not within the file",
        reason="RANGE_NOT_SATISFIABLE",
        http_status=416,
        headers={"Content-Range": f"bytes */{size}"} if size is not None else {},
    )
    return error.response()
