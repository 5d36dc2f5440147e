"""The OpenAPI 3 document of the routes, generated from the descriptors.

Schemas follow the proto3 JSON mapping the gateway speaks: camelCase names, 64-bit integers
as decimal strings, enums as their names, Timestamp as an RFC 3339 ``date-time`` string,
Duration as ``"1.5s"``, bytes as base64, a oneof as "at most one of these properties".
protovalidate rules become schema constraints where JSON Schema has one (lengths, patterns,
bounds of 32-bit numbers and doubles, item counts, uniqueness, enum subsets, the paths a
FieldMask may list, and a request member's CEL ``this.x != ''`` as "x required, not empty");
the rest (other CEL, 64-bit bounds on strings) stays with the services. Fields a request
must carry (``google.api.field_behavior = REQUIRED`` or ``buf.validate ... required``) are
required in request schemas only: responses may leave message fields out.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, cast

from buf.validate import validate_pb2
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    MethodDescriptor,
)

from services.gateway.binding import RequestBinder, is_query_value_message
from services.gateway.descriptors import ApiDescription, access_of
from services.gateway.ranges import is_byte_stream
from services.gateway.routing import Route, RouteTable, Variable

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedScalarFieldContainer
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

logger = logging.getLogger(__name__)

__all__ = ["STATUS_SCHEMA", "SchemaBuilder", "build_openapi"]

_REF = "#/components/schemas/"
_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated field paths in camelCase, e.g. `title,topics`.",
    },
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
_WRAPPER_TYPES = {
    "DoubleValue": FieldDescriptor.TYPE_DOUBLE,
    "FloatValue": FieldDescriptor.TYPE_FLOAT,
    "Int64Value": FieldDescriptor.TYPE_INT64,
    "UInt64Value": FieldDescriptor.TYPE_UINT64,
    "Int32Value": FieldDescriptor.TYPE_INT32,
    "UInt32Value": FieldDescriptor.TYPE_UINT32,
    "BoolValue": FieldDescriptor.TYPE_BOOL,
    "StringValue": FieldDescriptor.TYPE_STRING,
    "BytesValue": FieldDescriptor.TYPE_BYTES,
}
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "google.rpc.Status: a canonical gRPC code, a developer-facing message and details "
        "(google.rpc.ErrorInfo with a stable reason, BadRequest, RetryInfo, QuotaFailure...)."
    ),
    "properties": {
        "code": {"type": "integer", "format": "int32"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
    },
    "required": ["code", "message", "details"],
}
_STATUS_NAME = "google.rpc.Status"
_SEGMENT_FALLBACK = "^[^/:]+$"
_NUMBER_RULES = ("int32", "sint32", "sfixed32", "uint32", "fixed32", "double", "float")


def _rules(field: FieldDescriptor) -> validate_pb2.FieldRules | None:
    options = field.GetOptions()
    if not options.HasExtension(validate_pb2.field):
        return None
    return options.Extensions[validate_pb2.field]


# field_behavior_pb2.pyi types the extension as a plain FieldDescriptor: give it its real type.
_FIELD_BEHAVIOR = cast(
    "_ExtensionFieldDescriptor[descriptor_pb2.FieldOptions, RepeatedScalarFieldContainer[int]]",
    field_behavior_pb2.field_behavior,
)


def _behaviors(field: FieldDescriptor) -> list[int]:
    return list(field.GetOptions().Extensions[_FIELD_BEHAVIOR])


def _is_required(field: FieldDescriptor) -> bool:
    rules = _rules(field)
    if rules is not None and rules.required:
        return True
    behaviors = _behaviors(field)
    return field_behavior_pb2.REQUIRED in behaviors and field_behavior_pb2.OUTPUT_ONLY not in (
        behaviors
    )


def _string_constraints(rules: validate_pb2.StringRules) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    if rules.HasField("min_len"):
        schema["minLength"] = rules.min_len
    if rules.HasField("max_len"):
        schema["maxLength"] = rules.max_len
    if rules.HasField("len"):
        schema["minLength"] = schema["maxLength"] = rules.len
    patterns: list[str] = []
    if rules.HasField("pattern"):
        patterns.append(rules.pattern)
    if rules.HasField("prefix"):
        patterns.append("^" + re.escape(rules.prefix))
    if rules.HasField("uuid") and rules.uuid:
        schema["format"] = "uuid"
        patterns.append("^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
    if rules.HasField("email") and rules.email:
        schema["format"] = "email"
    if rules.HasField("uri") and rules.uri:
        schema["format"] = "uri"
    if patterns:
        # JSON Schema has one pattern per schema: several become lookaheads of one regex.
        schema["pattern"] = (
            patterns[0] if len(patterns) == 1 else "".join(f"(?={p})" for p in patterns)
        )
    if list(getattr(rules, "in")):
        schema["enum"] = list(getattr(rules, "in"))
    return schema


def _number_constraints(rules: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    if rules.HasField("gte"):
        schema["minimum"] = rules.gte
    if rules.HasField("gt"):
        schema["minimum"] = rules.gt
        schema["exclusiveMinimum"] = True
    if rules.HasField("lte"):
        schema["maximum"] = rules.lte
    if rules.HasField("lt"):
        schema["maximum"] = rules.lt
        schema["exclusiveMaximum"] = True
    return schema


def _enum_values(enum: EnumDescriptor, rules: validate_pb2.EnumRules | None) -> list[str]:
    values = [(v.number, v.name) for v in enum.values]
    if rules is not None:
        allowed = list(getattr(rules, "in"))
        excluded = set(rules.not_in)
        values = [
            (n, name) for n, name in values if n not in excluded and (not allowed or n in allowed)
        ]
    return [name for _, name in values]


def _first_sentence(comment: str) -> str:
    paragraph = " ".join(comment.strip().split("\n\n", 1)[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


class SchemaBuilder:
    """Builds component schemas for messages and enums, and inline field schemas.

    :param api: supplies comments.
    """

    def __init__(self, api: ApiDescription) -> None:
        self._api = api
        self.components: dict[str, Any] = {_STATUS_NAME: STATUS_SCHEMA}
        self._request_messages: set[str] = set()

    def mark_request(self, message: Descriptor) -> None:
        """Treat ``message`` as a request: its required fields are required."""
        self._request_messages.add(message.full_name)

    def ref(self, message: Descriptor) -> dict[str, Any]:
        """A schema referring to ``message`` (defining its component on first use)."""
        well_known = self._well_known(message)
        if well_known is not None:
            return dict(well_known)
        name = message.full_name
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursion stops here
            self.components[name] = self._message_schema(message)
        return {"$ref": _REF + name}

    def enum_ref(self, enum: EnumDescriptor) -> dict[str, Any]:
        """A schema referring to ``enum``."""
        name = enum.full_name
        if name not in self.components:
            self.components[name] = {
                "type": "string",
                "enum": [v.name for v in enum.values],
                "description": self._api.enum_comment(enum),
            }
        return {"$ref": _REF + name}

    def _well_known(self, message: Descriptor) -> dict[str, Any] | None:
        name = message.full_name
        if name in _WELL_KNOWN:
            return _WELL_KNOWN[name]
        if name.startswith("google.protobuf.") and message.name in _WRAPPER_TYPES:
            return {**_SCALARS[_WRAPPER_TYPES[message.name]], "nullable": True}
        return None

    def _message_schema(self, message: Descriptor) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required: list[str] = []
        request = message.full_name in self._request_messages
        for field in message.fields:
            properties[field.json_name] = self.field_schema(field)
            if request:
                properties[field.json_name] = _with_nonempty_members(
                    field, properties[field.json_name]
                )
                if _is_required(field):
                    required.append(field.json_name)
        # Unknown fields are refused (400), and responses never carry any.
        schema: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        comment = self._api.comment(message)
        if comment:
            schema["description"] = comment
        if required:
            schema["required"] = required
        groups = [
            [f.json_name for f in oneof.fields]
            for oneof in message.oneofs
            # proto3 `optional` makes a synthetic one-field oneof: no constraint there.
            if len(oneof.fields) > 1
        ]
        if groups:
            # "at most one of": exactly one branch holds (one member present, or none).
            schema["allOf"] = [
                {
                    "oneOf": [{"required": [member]} for member in members]
                    + [{"not": {"anyOf": [{"required": [m]} for m in members]}}]
                }
                for members in groups
            ]
        return schema

    def field_schema(self, field: FieldDescriptor, *, item: bool = False) -> dict[str, Any]:
        """The schema of one field (``item``: of one element of a repeated field)."""
        rules = _rules(field)
        if field.is_repeated and not item:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                value = entry.fields_by_name["value"]
                return self._describe(
                    field,
                    {"type": "object", "additionalProperties": self.field_schema(value)},
                )
            schema: dict[str, Any] = {"type": "array", "items": self.field_schema(field, item=True)}
            if rules is not None and rules.HasField("repeated"):
                repeated = rules.repeated
                if repeated.HasField("min_items"):
                    schema["minItems"] = repeated.min_items
                if repeated.HasField("max_items"):
                    schema["maxItems"] = repeated.max_items
                if repeated.unique:
                    schema["uniqueItems"] = True
            return self._describe(field, schema)
        if item and rules is not None and rules.HasField("repeated"):
            rules = rules.repeated.items
        schema = self._single(field, rules)
        if rules is not None and rules.ignore == validate_pb2.IGNORE_IF_ZERO_VALUE:
            zero = _zero_schema(field)
            if zero is not None and schema != _SCALARS.get(field.type):
                # The rules apply only to a set value: the zero value is fine as well.
                schema = {"anyOf": [zero, schema]}
        if item:
            return schema
        return self._describe(field, schema)

    def _single(
        self, field: FieldDescriptor, rules: validate_pb2.FieldRules | None
    ) -> dict[str, Any]:
        if field.message_type is not None:
            if rules is not None and rules.HasField("field_mask"):
                masked = _field_mask_schema(rules.field_mask)
                if masked is not None:
                    return masked
            return self.ref(field.message_type)
        if field.enum_type is not None:
            enum_rules = rules.enum if rules is not None and rules.HasField("enum") else None
            if enum_rules is not None and (enum_rules.not_in or list(getattr(enum_rules, "in"))):
                return {"type": "string", "enum": _enum_values(field.enum_type, enum_rules)}
            return self.enum_ref(field.enum_type)
        schema = dict(_SCALARS[field.type])
        if rules is None:
            return schema
        kind = rules.WhichOneof("type")
        if kind == "string":
            schema.update(_string_constraints(rules.string))
        elif kind in _NUMBER_RULES:
            schema.update(_number_constraints(getattr(rules, kind)))
        return schema

    def _describe(self, field: FieldDescriptor, schema: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        comment = self._api.comment(field)
        if comment:
            extra["description"] = comment
        if field_behavior_pb2.OUTPUT_ONLY in _behaviors(field):
            extra["readOnly"] = True
        if not extra:
            return schema
        if "$ref" in schema:
            # OpenAPI 3.0 ignores siblings of $ref: wrap it to keep the description.
            return {"allOf": [schema], **extra}
        return {**schema, **extra}


_NONEMPTY_CEL = re.compile(r"^this\.([a-z_][a-z0-9_]*) != ''$")


def _with_nonempty_members(field: FieldDescriptor, schema: dict[str, Any]) -> dict[str, Any]:
    """A request's message field with CEL rules ``this.x != ''``: ``x`` required, not empty.

    The member's own schema is shared with responses (where it may be empty), so the
    constraint is added beside it, for this field of this request only.
    """
    rules = _rules(field)
    nested = field.message_type
    if rules is None or nested is None or field.is_repeated:
        return schema
    names: list[str] = []
    for rule in rules.cel:
        found = _NONEMPTY_CEL.match(rule.expression)
        member = nested.fields_by_name.get(found.group(1)) if found else None
        if member is not None and member.type == FieldDescriptor.TYPE_STRING:
            names.append(member.json_name)
    if not names:
        return schema
    constraint = {
        "required": names,
        "properties": {name: {"type": "string", "minLength": 1} for name in names},
    }
    return {"allOf": [schema, constraint]}


def _camel_path(path: str) -> str:
    """A FieldMask path as proto3 JSON spells it (``scheduled_start_time`` → camelCase)."""
    return ".".join(
        head + "".join(word.capitalize() for word in rest)
        for head, *rest in (segment.split("_") for segment in path.split("."))
    )


def _field_mask_schema(rules: validate_pb2.FieldMaskRules) -> dict[str, Any] | None:
    """A FieldMask limited to ``in`` paths, comma-separated (empty: no paths; a required
    query parameter gets ``minLength`` on top)."""
    paths = [_camel_path(p) for p in getattr(rules, "in")]
    if not paths:
        return None
    one = "(" + "|".join(re.escape(p) for p in paths) + ")"
    return {
        **_WELL_KNOWN["google.protobuf.FieldMask"],
        "pattern": f"^({one}(,{one})*)?$",
        "description": "Comma-separated field paths in camelCase, any of: "
        + ", ".join(f"`{p}`" for p in paths)
        + ".",
    }


def _zero_schema(field: FieldDescriptor) -> dict[str, Any] | None:
    if field.type == FieldDescriptor.TYPE_STRING:
        return {"type": "string", "enum": [""]}
    return None


def _segment_patterns(route: Route, variable: Variable) -> list[str]:
    """Per-wildcard patterns derived from the field's name pattern (``^spaces/[a-z]+$``)."""
    fields = RequestBinder(route).path_fields(variable.field_path)
    rules = _rules(fields[-1]) if fields else None
    wildcards = variable.pattern.split("/")
    fallback = [_SEGMENT_FALLBACK for part in wildcards if part in ("*", "**")]
    if rules is None or not rules.HasField("string") or not rules.string.HasField("pattern"):
        return fallback
    pattern = rules.string.pattern
    if not (pattern.startswith("^") and pattern.endswith("$")):
        return fallback
    pieces = pattern[1:-1].split("/")
    if len(pieces) != len(wildcards):
        return fallback
    found: list[str] = []
    for piece, part in zip(pieces, wildcards, strict=True):
        if part in ("*", "**"):
            found.append(f"^{piece}$")
        elif piece != re.escape(part) and piece != part:
            return fallback
    return found


class _Operations:
    """Builds the ``paths`` object."""

    def __init__(self, api: ApiDescription, schemas: SchemaBuilder) -> None:
        self._api = api
        self._schemas = schemas
        self._operation_ids: set[str] = set()

    def operation(self, route: Route) -> tuple[str, dict[str, Any]]:
        method = route.method
        path, path_params = route.template.openapi_path()
        self._schemas.mark_request(method.input_type)
        comment = self._api.comment(method)
        operation: dict[str, Any] = {
            "operationId": self._operation_id(method),
            "tags": [method.containing_service.name],
            "summary": _first_sentence(comment),
            "description": comment,
            "parameters": self._path_parameters(route, path_params) + self._query(route),
            "responses": self._responses(route),
            "x-google-http-template": route.template.text,
        }
        if access_of(method) == 1:  # ACCESS_PUBLIC
            operation["security"] = []
        body = self._body(route)
        if body is not None:
            operation["requestBody"] = body
        if route.server_streaming and route.http_method == "GET":
            operation["x-websocket"] = True
        return path, operation

    def _operation_id(self, method: MethodDescriptor) -> str:
        base = f"{method.containing_service.name}_{method.name}"
        candidate, n = base, 1
        while candidate in self._operation_ids:
            n += 1
            candidate = f"{base}_{n}"
        self._operation_ids.add(candidate)
        return candidate

    def _path_parameters(
        self, route: Route, params: list[tuple[str, Variable]]
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        patterns: dict[str, list[str]] = {}
        for name, variable in params:
            queue = patterns.setdefault(
                variable.field_path, list(_segment_patterns(route, variable))
            )
            pattern = queue.pop(0) if queue else _SEGMENT_FALLBACK
            found.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "description": f"A segment of `{variable.field_path}` (`{variable.pattern}`).",
                    "schema": {"type": "string", "pattern": pattern},
                }
            )
        return found

    def _query(self, route: Route) -> list[dict[str, Any]]:
        binder = RequestBinder(route)
        if not binder.accepts_query:
            return []
        found: list[dict[str, Any]] = []

        def walk(message: Descriptor, prefix: list[FieldDescriptor], depth: int) -> None:
            for field in message.fields:
                fields = [*prefix, field]
                if not binder.is_query_field(fields):
                    continue
                name = ".".join(f.json_name for f in fields)
                nested = field.message_type
                if nested is not None and not is_query_value_message(nested):
                    # Singular messages open up into dotted parameters (a few levels deep:
                    # recursive messages would never end); maps and lists of them cannot.
                    plain = not field.is_repeated and not nested.GetOptions().map_entry
                    if plain and depth < 3:
                        walk(nested, fields, depth + 1)
                    continue
                schema = self._schemas.field_schema(field)
                required = not prefix and _is_required(field)
                if required and schema.get("type") == "string" and "minLength" not in schema:
                    schema = {**schema, "minLength": 1}  # a required value is not empty
                parameter: dict[str, Any] = {
                    "name": name,
                    "in": "query",
                    "required": required,
                    "schema": schema,
                }
                if field.is_repeated:
                    parameter["style"] = "form"
                    parameter["explode"] = True
                found.append(parameter)

        walk(route.method.input_type, [], 0)
        return found

    def _body(self, route: Route) -> dict[str, Any] | None:
        if not route.body:
            return None
        request = route.method.input_type
        if route.body == "*":
            self._schemas.ref(request)
            bound = {v.field_path.split(".")[0] for v in route.template.variables}
            if not bound:
                schema: dict[str, Any] = {"$ref": _REF + request.full_name}
            else:
                # Path-bound fields come from the path: leave them out of the body schema.
                full = self._schemas.components[request.full_name]
                keep = {f.json_name for f in request.fields if f.name not in bound}
                schema = {
                    **{k: v for k, v in full.items() if k not in ("properties", "required")},
                    "properties": {k: v for k, v in full["properties"].items() if k in keep},
                }
                required = [r for r in full.get("required", []) if r in keep]
                if required:
                    schema["required"] = required
            # An empty body is an empty message: required only when some field is.
            required_body = (
                bool(schema.get("required"))
                or "$ref" in schema
                and bool(self._schemas.components[request.full_name].get("required"))
            )
            return {
                "required": required_body,
                "content": {"application/json": {"schema": schema}},
            }
        field = request.fields_by_name[route.body]
        return {
            "required": _is_required(field),
            "content": {"application/json": {"schema": self._schemas.field_schema(field)}},
        }

    def _responses(self, route: Route) -> dict[str, Any]:
        error = {
            "description": "An error: a google.rpc.Status (the HTTP status follows the code).",
            "content": {"application/json": {"schema": {"$ref": _REF + _STATUS_NAME}}},
        }
        output = self._schemas.ref(route.method.output_type)
        if route.response_body:
            output = self._schemas.field_schema(
                route.method.output_type.fields_by_name[route.response_body]
            )
        if route.server_streaming and is_byte_stream(route.method):
            binary = {"schema": {"type": "string", "format": "binary"}}
            content = {"audio/ogg": binary, "application/octet-stream": binary}
            return {
                "200": {"description": "The whole file.", "content": content},
                "206": {"description": "The requested byte range.", "content": content},
                "416": {"description": "The range is not within the file.", **error},
                "default": error,
            }
        if route.server_streaming:
            return {
                "200": {
                    "description": (
                        "A stream of messages: over WebSocket one JSON text frame each "
                        '(a failure ends with {"error": Status} and close code 4000 + HTTP '
                        "status); over plain GET newline-delimited JSON."
                    ),
                    "content": {"application/x-ndjson": {"schema": output}},
                },
                "default": error,
            }
        return {
            "200": {"description": "OK", "content": {"application/json": {"schema": output}}},
            "default": error,
        }


def build_openapi(api: ApiDescription, table: RouteTable) -> dict[str, Any]:
    """The OpenAPI 3.0 document of every route in ``table``."""
    schemas = SchemaBuilder(api)
    operations = _Operations(api, schemas)
    paths: dict[str, dict[str, Any]] = {}
    tags = [
        {"name": service.name, "description": api.comments.get(service.full_name, "")}
        for service in api.services
    ]
    for route in sorted(table.routes, key=lambda r: r.template.text):
        path, operation = operations.operation(route)
        paths.setdefault(path, {})[route.http_method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Spaces API",
            "version": "v1",
            "description": (
                "HTTP/JSON transcoding of the Spaces gRPC services (google.api.http rules, "
                "proto3 JSON mapping). Errors are google.rpc.Status objects."
            ),
        },
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearerAuth": []}],
    }
