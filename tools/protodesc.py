"""Read ``build/spaces.binpb``: the descriptor set ``tools/protogen.py`` writes.

Shared by ``tools/apidoc.py`` and the proto contract tests. The set holds every file with
its imports and its source info (comments); custom options (``spaces.common.v1.access``,
``google.api.http``, ``buf.validate.field``) are read through the generated extension
modules, which are imported here so that parsing the set resolves them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from buf.validate import validate_pb2  # noqa: F401  (registers the buf.validate options)
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from spaces.common.v1 import options_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR_SET = ROOT / "build" / "spaces.binpb"
# Files of the product's own API; imports (google/*, buf/*) are not ours to check.
OWN_PREFIX = "spaces/"

FDP = descriptor_pb2.FileDescriptorProto
DP = descriptor_pb2.DescriptorProto
EDP = descriptor_pb2.EnumDescriptorProto
SDP = descriptor_pb2.ServiceDescriptorProto

Path_ = tuple[int, ...]

# annotations_pb2.pyi declares `http` as a plain FieldDescriptor; give it its real type.
HTTP_EXTENSION = cast(
    "_ExtensionFieldDescriptor[descriptor_pb2.MethodOptions, http_pb2.HttpRule]",
    annotations_pb2.http,
)


def load_descriptor_set(path: Path = DESCRIPTOR_SET) -> descriptor_pb2.FileDescriptorSet:
    """Parse the descriptor set; a missing file means ``make proto`` was not run."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make proto` first")
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def own_files(fds: descriptor_pb2.FileDescriptorSet) -> list[descriptor_pb2.FileDescriptorProto]:
    """The product's files (``spaces/...``), sorted by name."""
    return sorted((f for f in fds.file if f.name.startswith(OWN_PREFIX)), key=lambda f: f.name)


def leading_comments(file: descriptor_pb2.FileDescriptorProto) -> dict[Path_, str]:
    """Map each element's source path to its leading comment (without the ``//``)."""
    return {
        tuple(loc.path): loc.leading_comments
        for loc in file.source_code_info.location
        if loc.HasField("leading_comments")
    }


def messages_by_name(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, DP]:
    """Every message of the set (nested ones too), by fully qualified name with a dot."""
    found: dict[str, DP] = {}

    def walk(prefix: str, messages: list[DP]) -> None:
        for message in messages:
            full = f"{prefix}.{message.name}"
            found[full] = message
            walk(full, list(message.nested_type))

    for file in fds.file:
        walk(f".{file.package}" if file.package else "", list(file.message_type))
    return found


@dataclass(frozen=True)
class Element:
    """A commentable element of a file: its kind, full name and source path."""

    kind: str
    name: str
    path: Path_


def _message_elements(message: DP, prefix: str, path: Path_) -> Iterator[Element]:
    full = f"{prefix}.{message.name}"
    if message.options.map_entry:
        return  # synthetic map entry: it has no source of its own
    yield Element("message", full, path)
    for i, field in enumerate(message.field):
        yield Element("field", f"{full}.{field.name}", (*path, DP.FIELD_FIELD_NUMBER, i))
    for i, nested in enumerate(message.nested_type):
        yield from _message_elements(nested, full, (*path, DP.NESTED_TYPE_FIELD_NUMBER, i))
    for i, enum in enumerate(message.enum_type):
        yield from _enum_elements(enum, full, (*path, DP.ENUM_TYPE_FIELD_NUMBER, i))


def _enum_elements(enum: EDP, prefix: str, path: Path_) -> Iterator[Element]:
    full = f"{prefix}.{enum.name}"
    yield Element("enum", full, path)
    for i, value in enumerate(enum.value):
        yield Element("enum value", f"{full}.{value.name}", (*path, EDP.VALUE_FIELD_NUMBER, i))


def elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[Element]:
    """Every service, RPC, message, field, enum and enum value of a file."""
    for i, message in enumerate(file.message_type):
        yield from _message_elements(message, file.package, (FDP.MESSAGE_TYPE_FIELD_NUMBER, i))
    for i, enum in enumerate(file.enum_type):
        yield from _enum_elements(enum, file.package, (FDP.ENUM_TYPE_FIELD_NUMBER, i))
    for i, service in enumerate(file.service):
        full = f"{file.package}.{service.name}"
        path = (FDP.SERVICE_FIELD_NUMBER, i)
        yield Element("service", full, path)
        for j, method in enumerate(service.method):
            yield Element("rpc", f"{full}.{method.name}", (*path, SDP.METHOD_FIELD_NUMBER, j))


def method_comment(file: descriptor_pb2.FileDescriptorProto, service: int, method: int) -> str:
    """The leading comment of ``file.service[service].method[method]``."""
    path = (FDP.SERVICE_FIELD_NUMBER, service, SDP.METHOD_FIELD_NUMBER, method)
    return leading_comments(file).get(path, "")


def access_name(method: descriptor_pb2.MethodDescriptorProto) -> str | None:
    """The method's ``spaces.common.v1.access`` value name, or None when the option is unset."""
    if not method.options.HasExtension(options_pb2.access):
        return None
    value = method.options.Extensions[options_pb2.access]
    return options_pb2.Access.Name(value)


def http_rule(method: descriptor_pb2.MethodDescriptorProto) -> http_pb2.HttpRule | None:
    """The method's ``google.api.http`` rule, or None when it has none."""
    if not method.options.HasExtension(HTTP_EXTENSION):
        return None
    return method.options.Extensions[HTTP_EXTENSION]


def http_bindings(rule: http_pb2.HttpRule) -> list[tuple[str, str]]:
    """(HTTP method, path template) of a rule and of its additional bindings."""
    found: list[tuple[str, str]] = []
    for binding in (rule, *rule.additional_bindings):
        kind = binding.WhichOneof("pattern")
        if kind is None:
            continue
        if kind == "custom":
            found.append((binding.custom.kind.upper(), binding.custom.path))
        else:
            found.append((kind.upper(), str(getattr(binding, kind))))
    return found


def first_sentence(comment: str) -> str:
    """The first sentence of a comment, on one line."""
    paragraph = " ".join(comment.strip().split("\n\n", 1)[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]
