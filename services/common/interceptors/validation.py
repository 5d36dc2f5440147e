"""Validates requests against the protovalidate rules in their protos before the handler runs.

A bad request gets INVALID_ARGUMENT with one ``google.rpc.BadRequest`` field violation per
broken rule, the field given as a path (``space.title``, ``speakers[2]``, ``labels["k"]``)
and described by the rule's message. Requests of client-streaming RPCs are not checked here:
such handlers validate each message they read.

One rule holds for every string of every request without being written in the protos: no
NUL character (U+0000). No text of the product needs one, and PostgreSQL cannot store it.

Bytes that do not parse as the request message at all (a corrupt wire format, a string field
holding invalid UTF-8) are INVALID_ARGUMENT too, without field violations: left to gRPC they
would be UNKNOWN, carrying the parser's text, as if the server had failed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import protovalidate
from google.protobuf.message import Message

from services.common.errors import InvalidArgument
from services.common.interceptors.base import ScopedServerInterceptor, ServerCall

logger = logging.getLogger(__name__)

__all__ = [
    "UndecodableRequest",
    "ValidationInterceptor",
    "field_path",
    "nul_fields",
    "violations_of",
]


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request whose bytes did not parse, until validation refuses it.

    :ivar error: the parser's exception type (for the log; the caller is not told).
    """

    error: str


class ValidationInterceptor(ScopedServerInterceptor):
    """Rejects requests that break their proto's validation rules."""

    def __init__(self) -> None:
        # One validator caches the compiled rules of every message type it has seen.
        self._validator = protovalidate.Validator()

    def scope(self, call: ServerCall) -> AbstractAsyncContextManager[None]:
        return self._validate(call)

    def request_deserializer(
        self, deserializer: Callable[[bytes], Any] | None
    ) -> Callable[[bytes], Any] | None:
        if deserializer is None:
            return None
        parse = deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as error:  # DecodeError, or whatever hostile bytes provoke
                # Refused in the call's scope (after authentication), not here: raising
                # would make gRPC answer UNKNOWN before any interceptor runs.
                return UndecodableRequest(type(error).__name__)

        return tolerant

    @asynccontextmanager
    async def _validate(self, call: ServerCall) -> AsyncIterator[None]:
        if isinstance(call.request, UndecodableRequest):
            logger.debug("%s: undecodable request (%s)", call.method.full, call.request.error)
            raise InvalidArgument(
                "invalid request: the bytes are not a valid message of the request type"
                " (corrupt wire format or a string that is not UTF-8)",
                reason="INVALID_ARGUMENT",
            )
        if isinstance(call.request, Message) and not call.method.is_infrastructure:
            violations = violations_of(self._validator.collect_violations(call.request))
            violations += [
                (path, "must not contain NUL characters") for path in nul_fields(call.request)
            ]
            if violations:
                summary = "; ".join(f"{path or '(request)'}: {text}" for path, text in violations)
                raise InvalidArgument(
                    f"invalid request: {summary}",
                    reason="INVALID_ARGUMENT",
                    field_violations=violations,
                )
        yield


def nul_fields(message: Message, prefix: str = "") -> list[str]:
    """Paths of the string fields of ``message`` (nested ones too) holding a NUL character."""
    found: list[str] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    found += nul_fields(item, f'{path}["{key}"].')
                elif "\x00" in str(key) or (isinstance(item, str) and "\x00" in item):
                    found.append(path)
        elif field.type == field.TYPE_STRING:
            items = value if field.is_repeated else [value]
            if any("\x00" in item for item in items):
                found.append(path)
        elif field.type == field.TYPE_MESSAGE:
            children = value if field.is_repeated else [value]
            for index, child in enumerate(children):
                at = f"{path}[{index}]." if field.is_repeated else f"{path}."
                found += nul_fields(child, at)
    return found


def violations_of(violations: Iterable[Any]) -> list[tuple[str, str]]:
    """Turn protovalidate violations into ``(field path, description)`` pairs.

    A message-level rule (a CEL expression over several fields) has no field: its path is
    empty, which BadRequest reads as "the request as a whole".
    """
    return [
        (field_path(v.proto.field.elements) if v.proto.field is not None else "", v.proto.message)
        for v in violations
    ]


def field_path(elements: Iterable[Any]) -> str:
    """Render protovalidate ``FieldPathElement`` s as ``a.b[2].c["key"]``."""
    parts: list[str] = []
    for element in elements:
        part = element.field_name
        subscript = element.subscript
        if subscript is not None:
            if subscript.field == "string_key":
                part += f'["{subscript.value}"]'
            elif subscript.field == "bool_key":
                part += f"[{str(subscript.value).lower()}]"
            else:
                part += f"[{subscript.value}]"
        parts.append(part)
    return ".".join(parts)
