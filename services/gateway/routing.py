"""Path templates of ``google.api.http`` rules, the route table and the matcher.

The template grammar is google/api/http.proto's::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb     = ":" LITERAL ;

A template is compiled to a flat list of segment matchers (a variable contributes the
segments of its pattern, ``{x}`` meaning ``{x=*}``), so matching is one left-to-right walk.
When several routes match a request, the most specific wins, as in grpc-gateway: a route
with a custom verb before one without, then, segment by segment, a literal before ``*``
before ``**``.

Values of variables are percent-decoded the way http.proto asks: a single-segment variable
fully (``%2F`` becomes ``/``); a multi-segment one keeps reserved characters encoded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

from google.api import http_pb2
from google.protobuf.descriptor import MethodDescriptor

logger = logging.getLogger(__name__)

__all__ = [
    "PathTemplate",
    "Route",
    "RouteMatch",
    "RouteTable",
    "TemplateError",
    "Variable",
    "http_bindings",
]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# RFC 6570 reserved characters: left encoded in multi-segment variables.
_RESERVED = frozenset(":/?#[]@!$&'()*+,;=")
_ESCAPE = re.compile(r"((?:%[0-9A-Fa-f]{2})+)")

_LITERAL = 0
_STAR = 1
_DOUBLE_STAR = 2


class TemplateError(ValueError):
    """A path template that does not follow http.proto's grammar."""


@dataclass(frozen=True)
class _Segment:
    kind: int
    literal: str = ""


@dataclass(frozen=True)
class Variable:
    """A ``{field_path=pattern}`` of a template.

    :ivar field_path: the request field it binds, dotted (``space.name``).
    :ivar start: index of its first segment in :attr:`PathTemplate.segments`.
    :ivar end: index after its last segment.
    :ivar pattern: its pattern as written (``spaces/*``).
    """

    field_path: str
    start: int
    end: int
    pattern: str

    @property
    def single_segment(self) -> bool:
        """Whether the variable spans exactly one ``*`` segment (full decoding applies)."""
        return self.end - self.start == 1 and self.pattern == "*"


@dataclass(frozen=True)
class PathTemplate:
    """A compiled path template.

    :ivar text: the template as written in the rule.
    :ivar segments: segment matchers, variables expanded.
    :ivar variables: the variables, in order.
    :ivar verb: the custom verb (without ``:``), or ``""``.
    """

    text: str
    segments: tuple[_Segment, ...]
    variables: tuple[Variable, ...]
    verb: str

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        """Compile ``text``.

        :raises TemplateError: when it does not follow the grammar.
        """
        if not text.startswith("/"):
            raise TemplateError(f"template must start with '/': {text!r}")
        body, verb = _split_verb(text[1:])
        segments: list[_Segment] = []
        variables: list[Variable] = []
        for token in _top_level_tokens(body, text):
            if token.startswith("{"):
                inner = token[1:-1]
                name, eq, pattern = inner.partition("=")
                if not _IDENT.match(name):
                    raise TemplateError(f"bad field path {name!r} in {text!r}")
                pattern = pattern if eq else "*"
                if "{" in pattern or "}" in pattern:
                    raise TemplateError(f"nested variable in {text!r}")
                start = len(segments)
                segments.extend(_segment(part, text) for part in pattern.split("/"))
                variables.append(Variable(name, start, len(segments), pattern))
            else:
                segments.append(_segment(token, text))
        for i, segment in enumerate(segments):
            if segment.kind == _DOUBLE_STAR and i != len(segments) - 1:
                raise TemplateError(f"'**' must be the last segment: {text!r}")
        if len({v.field_path for v in variables}) != len(variables):
            raise TemplateError(f"a field is bound twice in {text!r}")
        return cls(text, tuple(segments), tuple(variables), verb)

    def match(self, path: str) -> dict[str, str] | None:
        """Return the variables' values when ``path`` (raw, still percent-encoded) matches.

        :param path: the request path as sent, e.g. ``/v1/spaces/abc:join``.
        """
        if not path.startswith("/"):
            return None
        rest = path[1:]
        if self.verb:
            head, colon, verb = rest.rpartition(":")
            # The verb follows the last segment, so it may not contain a '/'.
            if not colon or "/" in verb or unquote(verb) != self.verb:
                return None
            rest = head
        parts = rest.split("/")
        ends = self._match_segments(parts)
        if ends is None:
            return None
        values: dict[str, str] = {}
        for variable in self.variables:
            # Segments consume parts contiguously: a variable starts right after the
            # previous segment's last part.
            start = ends[variable.start - 1] + 1 if variable.start else 0
            raw = parts[start : ends[variable.end - 1] + 1]
            if variable.single_segment:
                values[variable.field_path] = unquote(raw[0])
            else:
                values[variable.field_path] = "/".join(_unquote_unreserved(p) for p in raw)
        return values

    def _match_segments(self, parts: list[str]) -> list[int] | None:
        """Return, per template segment, the index of the last path part it consumed."""
        ends: list[int] = []
        i = 0
        for segment in self.segments:
            if segment.kind == _DOUBLE_STAR:
                if i >= len(parts) or any(p == "" for p in parts[i:]):
                    return None
                i = len(parts)
                ends.append(i - 1)
                continue
            if i >= len(parts) or parts[i] == "":
                return None
            if segment.kind == _LITERAL and unquote(parts[i]) != segment.literal:
                return None
            ends.append(i)
            i += 1
        if i != len(parts):
            return None
        return ends

    def specificity(self) -> tuple[int, tuple[int, ...], int]:
        """Sort key: lower sorts first (wins). Verb routes, then literal-first segments."""
        return (0 if self.verb else 1, tuple(s.kind for s in self.segments), -len(self.segments))

    def openapi_path(self) -> tuple[str, list[tuple[str, Variable]]]:
        """The template as an OpenAPI path, and its parameters.

        OpenAPI parameters cannot contain ``/``, so a multi-segment variable keeps its
        literals and each wildcard is named, AIP-style, after the collection before it
        (``{name=spaces/*/participants/*}`` → ``spaces/{space}/participants/{participant}``).
        A single-segment variable is named after its field path (dots become ``_``, which
        URI template tools read as one name).
        """
        out: list[str] = []
        params: list[tuple[str, Variable]] = []
        used: set[str] = set()

        def unique(name: str) -> str:
            candidate, n = name, 1
            while candidate in used:
                n += 1
                candidate = f"{name}{n}"
            used.add(candidate)
            return candidate

        variables = {v.start: v for v in self.variables}
        index = 0
        while index < len(self.segments):
            variable = variables.get(index)
            if variable is None:
                out.append(_render(self.segments[index]))
                index += 1
                continue
            fallback = variable.field_path.replace(".", "_")
            if variable.single_segment:
                name = unique(fallback)
                out.append("{" + name + "}")
                params.append((name, variable))
            else:
                previous = fallback
                for segment in self.segments[variable.start : variable.end]:
                    if segment.kind == _LITERAL:
                        out.append(segment.literal)
                        previous = _singular(segment.literal)
                        continue
                    name = unique(previous if segment.kind == _STAR else f"{previous}_path")
                    out.append("{" + name + "}")
                    params.append((name, variable))
            index = variable.end
        path = "/" + "/".join(out)
        return (f"{path}:{self.verb}" if self.verb else path), params

    def shape(self) -> tuple[tuple[int, str], ...]:
        """What the template matches, ignoring variable names (two equal shapes clash)."""
        kinds = tuple((s.kind, s.literal) for s in self.segments)
        return (*kinds, (-1, self.verb))


def _singular(collection: str) -> str:
    if collection.endswith("ies"):
        return collection[:-3] + "y"
    if collection.endswith("s"):
        return collection[:-1]
    return collection


def _render(segment: _Segment) -> str:
    if segment.kind == _LITERAL:
        return segment.literal
    return "*" if segment.kind == _STAR else "**"


def _split_verb(body: str) -> tuple[str, str]:
    # A ':' outside braces in the last segment starts the verb; inside braces it is part
    # of a variable's pattern (which http.proto does not allow anyway).
    depth = 0
    for i in range(len(body) - 1, -1, -1):
        char = body[i]
        if char == "}":
            depth += 1
        elif char == "{":
            depth -= 1
        elif char == "/" and depth == 0:
            break
        elif char == ":" and depth == 0:
            verb = body[i + 1 :]
            if not verb or "/" in verb:
                raise TemplateError(f"bad verb in {body!r}")
            return body[:i], verb
    return body, ""


def _top_level_tokens(body: str, text: str) -> Iterable[str]:
    depth = 0
    current = ""
    for char in body:
        if char == "{":
            if depth:
                raise TemplateError(f"nested '{{' in {text!r}")
            depth = 1
        elif char == "}":
            if not depth:
                raise TemplateError(f"unbalanced '}}' in {text!r}")
            depth = 0
        if char == "/" and not depth:
            yield current
            current = ""
        else:
            current += char
    if depth:
        raise TemplateError(f"unbalanced '{{' in {text!r}")
    yield current


def _segment(token: str, text: str) -> _Segment:
    if token == "*":
        return _Segment(_STAR)
    if token == "**":
        return _Segment(_DOUBLE_STAR)
    if not token or any(c in token for c in "{}*:"):
        raise TemplateError(f"bad segment {token!r} in {text!r}")
    return _Segment(_LITERAL, token)


def _unquote_unreserved(part: str) -> str:
    def decode(match: re.Match[str]) -> str:
        decoded = unquote(match.group(1))
        # Re-encode reserved characters one by one; keep the rest decoded.
        return "".join(f"%{ord(c):02X}" if c in _RESERVED else c for c in decoded)

    return _ESCAPE.sub(decode, part)


def http_bindings(rule: http_pb2.HttpRule) -> list[tuple[str, str, str]]:
    """``(HTTP method, path template, body)`` of a rule and of its additional bindings."""
    found: list[tuple[str, str, str]] = []
    for binding in (rule, *rule.additional_bindings):
        kind = binding.WhichOneof("pattern")
        if kind is None:
            continue
        if kind == "custom":
            found.append((binding.custom.kind.upper(), binding.custom.path, binding.body))
        else:
            found.append((kind.upper(), str(getattr(binding, kind)), binding.body))
    return found


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC.

    :ivar http_method: ``GET``, ``POST``, ...
    :ivar template: the compiled path template.
    :ivar body: the rule's ``body``: ``""`` (none), ``"*"`` or a top-level field name.
    :ivar response_body: the rule's ``response_body`` (``""`` = the whole response).
    :ivar method: the RPC.
    """

    http_method: str
    template: PathTemplate
    body: str
    response_body: str
    method: MethodDescriptor = field(compare=False)

    @property
    def server_streaming(self) -> bool:
        """Whether the RPC streams its responses."""
        return bool(self.method.server_streaming)

    @property
    def grpc_path(self) -> str:
        """The gRPC method path: ``/spaces.rooms.v1.RoomsService/GetSpace``."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


@dataclass(frozen=True)
class RouteMatch:
    """A route that matched a request, with its path variables."""

    route: Route
    path_params: dict[str, str]


class RouteTable:
    """Every route, tried most specific first.

    :param routes: the routes; order does not matter.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = sorted(routes, key=lambda r: r.template.specificity())
        self._seen: set[tuple[str, tuple[tuple[int, str], ...]]] = set()
        for route in self._routes:
            key = (route.http_method, route.template.shape())
            if key in self._seen:
                raise TemplateError(f"two RPCs bind {route.http_method} {route.template.text}")
            self._seen.add(key)

    @property
    def routes(self) -> list[Route]:
        """The routes, most specific first."""
        return list(self._routes)

    def match(self, http_method: str, path: str) -> RouteMatch | None:
        """Return the route for ``http_method`` and the raw ``path``, if any."""
        shadowed = self._verb_shadows(path)
        for route in self._routes:
            if route.http_method != http_method or (shadowed and not route.template.verb):
                continue
            values = route.template.match(path)
            if values is not None:
                return RouteMatch(route, values)
        return None

    def allowed_methods(self, path: str) -> list[str]:
        """HTTP methods some route accepts at ``path`` (for 405 and CORS answers)."""
        shadowed = self._verb_shadows(path)
        return sorted(
            {
                r.http_method
                for r in self._routes
                if (r.template.verb or not shadowed) and r.template.match(path) is not None
            }
        )

    def _verb_shadows(self, path: str) -> bool:
        """Whether ``path`` names a custom method (``.../x:block``) some route serves.

        grpc-gateway would let a verb-less route swallow the verb into its last variable
        (``PATCH /v1/users/0:block`` updating user ``0:block``); a path that is a custom
        method of some other HTTP method is refused with 405 instead, which is what a
        client sending the wrong method needs to hear.
        """
        last = path.rsplit("/", 1)[-1]
        if ":" not in last:
            return False
        return any(r.template.verb and r.template.match(path) is not None for r in self._routes)
