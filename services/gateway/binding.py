"""Building the gRPC request message from an HTTP request, by google/api/http.proto's rules.

* Path variables bind the (possibly nested) fields they name.
* ``body: "*"`` maps the whole JSON body onto the request; ``body: "<field>"`` maps it onto
  that one top-level field; no body means the request has none.
* Every field bound neither by the path nor by the body may come as a query parameter, by
  proto or JSON name, nested with dots (``filter.state=LIVE``); a repeated field takes every
  occurrence (``states=LIVE&states=SCHEDULED``). Only scalars, enums and the well-known
  types written as JSON strings (Timestamp, Duration, FieldMask, wrappers) can be given that
  way, as in grpc-gateway.

JSON goes through ``google.protobuf.json_format``: both field names accepted, unknown fields
refused (400) rather than silently dropped, so a typo in a client is caught at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.gateway.errors import GatewayError
from services.gateway.routing import Route

logger = logging.getLogger(__name__)

__all__ = [
    "RESERVED_QUERY_PARAMETERS",
    "RequestBinder",
    "is_query_value_message",
    "message_class",
]

# Query parameters the gateway consumes itself, never bound to a request field.
RESERVED_QUERY_PARAMETERS = frozenset({"access_token"})

# Messages whose proto3 JSON form is a single string (or number): they may be query values.
_STRING_MESSAGES = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
    }
)
_WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})
# Errors json_format lets through besides ParseError on hostile input.
_PARSE_ERRORS = (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError)


def is_query_value_message(descriptor: Descriptor) -> bool:
    """Whether a message-typed field may be given as a query (or path) value."""
    return descriptor.full_name in _STRING_MESSAGES or descriptor.full_name in _WRAPPERS


def message_class(descriptor: Descriptor) -> type[Message]:
    """The generated (or synthesized) class of a message in the default pool."""
    return message_factory.GetMessageClass(descriptor)


def _field(message: Descriptor, name: str) -> FieldDescriptor | None:
    found = message.fields_by_name.get(name)
    if found is not None:
        return found
    for candidate in message.fields:
        if candidate.json_name == name:
            return candidate
    return None


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_map(field: FieldDescriptor) -> bool:
    return (
        _is_repeated(field)
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


def _scalar_value(field: FieldDescriptor, text: str, path: str) -> Any:
    """``text`` as the JSON value json_format expects for ``field``."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise GatewayError.bad_request(
            f"{path}: expected true or false", field=path, reason="INVALID_QUERY_PARAMETER"
        )
    if field.type == FieldDescriptor.TYPE_ENUM and text.lstrip("-").isdigit():
        return int(text)
    if field.message_type is not None:
        name = field.message_type.full_name
        if name in _WRAPPERS:
            return _scalar_value(field.message_type.fields_by_name["value"], text, path)
        if name not in _STRING_MESSAGES:
            raise GatewayError.bad_request(
                f"{path}: a message field cannot be a query or path parameter",
                field=path,
                reason="INVALID_QUERY_PARAMETER",
            )
    return text


class _FieldTree:
    """A nested dict (by proto field names) of values for json_format.ParseDict."""

    def __init__(self, root: Descriptor) -> None:
        self._root = root
        self.values: dict[str, Any] = {}

    def resolve(self, dotted: str) -> list[FieldDescriptor] | None:
        """The fields along ``dotted`` (proto or JSON names), or None if one is unknown."""
        fields: list[FieldDescriptor] = []
        message: Descriptor | None = self._root
        for part in dotted.split("."):
            if message is None:
                return None
            field = _field(message, part)
            if field is None:
                return None
            fields.append(field)
            message = field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None
        return fields

    def set(self, fields: list[FieldDescriptor], values: list[str], path: str) -> None:
        node = self.values
        for parent in fields[:-1]:
            if _is_repeated(parent):
                raise GatewayError.bad_request(
                    f"{path}: cannot address into a repeated field",
                    field=path,
                    reason="INVALID_QUERY_PARAMETER",
                )
            child = node.setdefault(parent.name, {})
            if not isinstance(child, dict):
                raise GatewayError.bad_request(
                    f"{path}: given twice", field=path, reason="INVALID_QUERY_PARAMETER"
                )
            node = child
        leaf = fields[-1]
        if _is_map(leaf):
            raise GatewayError.bad_request(
                f"{path}: map fields cannot be query parameters",
                field=path,
                reason="INVALID_QUERY_PARAMETER",
            )
        if leaf.name in node:
            raise GatewayError.bad_request(
                f"{path}: given twice", field=path, reason="INVALID_QUERY_PARAMETER"
            )
        converted = [_scalar_value(leaf, v, path) for v in values]
        if _is_repeated(leaf):
            node[leaf.name] = converted
        elif len(converted) != 1:
            raise GatewayError.bad_request(
                f"{path}: takes one value", field=path, reason="INVALID_QUERY_PARAMETER"
            )
        else:
            node[leaf.name] = converted[0]


def _first_line(error: Exception) -> str:
    # json_format appends the list of available fields on further lines: noise to clients.
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _proto_path(fields: list[FieldDescriptor]) -> str:
    return ".".join(f.name for f in fields)


class RequestBinder:
    """Builds the request message of one route.

    :param route: the route whose RPC's request is built.
    """

    def __init__(self, route: Route) -> None:
        self._route = route
        self._descriptor = route.method.input_type
        self._class = message_class(self._descriptor)
        tree = _FieldTree(self._descriptor)
        self._path_fields: dict[str, list[FieldDescriptor]] = {}
        for variable in route.template.variables:
            fields = tree.resolve(variable.field_path)
            if fields is None:
                raise ValueError(
                    f"{route.method.full_name}: path binds unknown field {variable.field_path}"
                )
            self._path_fields[variable.field_path] = fields
        self._body_field: FieldDescriptor | None = None
        if route.body and route.body != "*":
            body_field = _field(self._descriptor, route.body)
            if body_field is None:
                raise ValueError(f"{route.method.full_name}: body names unknown {route.body}")
            self._body_field = body_field
        self._bound_prefixes = {_proto_path(f) for f in self._path_fields.values()}
        if self._body_field is not None:
            self._bound_prefixes.add(self._body_field.name)

    def path_fields(self, field_path: str) -> list[FieldDescriptor]:
        """The fields along a path variable's field path."""
        return list(self._path_fields.get(field_path, []))

    @property
    def accepts_query(self) -> bool:
        """Whether any field may come as a query parameter (not with ``body: "*"``)."""
        return self._route.body != "*"

    def is_query_field(self, fields: list[FieldDescriptor]) -> bool:
        """Whether the field at ``fields`` may be given as a query parameter."""
        if not self.accepts_query:
            return False
        path = _proto_path(fields)
        return not any(
            path == prefix or path.startswith(prefix + ".") or prefix.startswith(path + ".")
            for prefix in self._bound_prefixes
        )

    def build(
        self,
        path_params: Mapping[str, str],
        query: Iterable[tuple[str, str]],
        body: bytes,
    ) -> Message:
        """Return the request message.

        :param path_params: the route's variables, by field path.
        :param query: query parameters in order, repeated keys repeated.
        :param body: the raw request body (may be empty).
        :raises GatewayError: INVALID_ARGUMENT for anything that does not bind.
        """
        request = self._class()
        self._bind_body(request, body)
        tree = _FieldTree(self._descriptor)
        for field_path, value in path_params.items():
            tree.set(self._path_fields[field_path], [value], field_path)
        grouped: dict[str, list[str]] = {}
        for key, value in query:
            if key not in RESERVED_QUERY_PARAMETERS:
                grouped.setdefault(key, []).append(value)
        for key, values in grouped.items():
            fields = tree.resolve(key)
            if fields is None or not self.is_query_field(fields):
                raise GatewayError.bad_request(
                    f"unknown query parameter {key!r}", field=key, reason="UNKNOWN_QUERY_PARAMETER"
                )
            tree.set(fields, values, key)
        bound = self._class()
        try:
            json_format.ParseDict(tree.values, bound)
        except _PARSE_ERRORS as error:
            raise GatewayError.bad_request(
                f"bad path or query parameter: {_first_line(error)}",
                reason="INVALID_QUERY_PARAMETER",
            ) from None
        # Path values win over the body's (grpc-gateway sets them after decoding the body).
        request.MergeFrom(bound)
        return request

    def _bind_body(self, request: Message, body: bytes) -> None:
        if not self._route.body:
            return
        if not body.strip():
            return
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise GatewayError.bad_request(
                "request body is not valid JSON", reason="INVALID_JSON"
            ) from None
        if self._body_field is not None:
            document = {self._body_field.name: document}
        elif not isinstance(document, dict):
            raise GatewayError.bad_request(
                "request body must be a JSON object", reason="INVALID_JSON"
            )
        try:
            json_format.ParseDict(document, request)
        except _PARSE_ERRORS as error:
            raise GatewayError.bad_request(
                f"request body does not match {self._descriptor.name}: {_first_line(error)}",
                reason="INVALID_JSON",
            ) from None
