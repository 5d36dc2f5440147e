"""The API the gateway serves: the services of the compiled descriptor set, and their docs.

``tools/protogen.py`` writes every product proto into ``build/spaces.binpb`` and generates
the Python modules into ``build/gen``. The set tells which files the product has; importing
each file's generated module puts its descriptors (with their options: ``google.api.http``,
``buf.validate``, ``spaces.common.v1.access``) into the default pool, whose message classes
``json_format`` and ``grpc_status`` also use. The set's source info supplies the comments
the OpenAPI document shows.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from buf.validate import validate_pb2  # noqa: F401  (registers the buf.validate options)
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.rpc import error_details_pb2  # noqa: F401  (error details for json_format)
from spaces.common.v1 import options_pb2

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_DESCRIPTOR_SET", "ApiDescription", "access_of", "http_rule", "load_api"]

DEFAULT_DESCRIPTOR_SET = Path(__file__).resolve().parents[2] / "build" / "spaces.binpb"
_OWN_PREFIX = "spaces/"

FDP = descriptor_pb2.FileDescriptorProto
DP = descriptor_pb2.DescriptorProto
SDP = descriptor_pb2.ServiceDescriptorProto
EDP = descriptor_pb2.EnumDescriptorProto


def http_rule(method: MethodDescriptor) -> http_pb2.HttpRule | None:
    """The method's ``google.api.http`` rule, or None (ACCESS_INTERNAL RPCs have none)."""
    options = method.GetOptions()
    extension = annotations_pb2.http
    if not options.HasExtension(extension):  # type: ignore[arg-type]
        return None
    return cast(http_pb2.HttpRule, options.Extensions[extension])  # type: ignore[index]


def access_of(method: MethodDescriptor) -> int:
    """The method's ``spaces.common.v1.access`` value (ACCESS_UNSPECIFIED when unset)."""
    return int(method.GetOptions().Extensions[options_pb2.access])


@dataclass
class ApiDescription:
    """The services the gateway exposes and the comments of their elements.

    :ivar services: service descriptors from the default pool.
    :ivar comments: leading comments by full name (``spaces.rooms.v1.Space.title``).
    """

    services: list[ServiceDescriptor]
    comments: dict[str, str] = field(default_factory=dict)

    def comment(self, element: Descriptor | FieldDescriptor | MethodDescriptor) -> str:
        """The element's leading comment, trimmed (empty when it has none)."""
        return self.comments.get(element.full_name, "")

    def enum_comment(self, enum: EnumDescriptor) -> str:
        """An enum's leading comment."""
        return self.comments.get(enum.full_name, "")


def _module_name(file_name: str) -> str:
    return file_name.removesuffix(".proto").replace("/", ".").replace("-", "_") + "_pb2"


def _dedent(comment: str) -> str:
    # protoc keeps the space after each "//": drop it so Markdown renders as written.
    lines = comment.splitlines()
    return "\n".join(line[1:] if line.startswith(" ") else line for line in lines).strip()


def _collect_comments(file: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    by_path = {
        tuple(loc.path): _dedent(loc.leading_comments)
        for loc in file.source_code_info.location
        if loc.HasField("leading_comments")
    }
    found: dict[str, str] = {}

    def message(msg: descriptor_pb2.DescriptorProto, prefix: str, path: tuple[int, ...]) -> None:
        full = f"{prefix}.{msg.name}"
        found[full] = by_path.get(path, "")
        for i, f in enumerate(msg.field):
            found[f"{full}.{f.name}"] = by_path.get((*path, DP.FIELD_FIELD_NUMBER, i), "")
        for i, nested in enumerate(msg.nested_type):
            message(nested, full, (*path, DP.NESTED_TYPE_FIELD_NUMBER, i))
        for i, enum in enumerate(msg.enum_type):
            found[f"{full}.{enum.name}"] = by_path.get((*path, DP.ENUM_TYPE_FIELD_NUMBER, i), "")

    for i, msg in enumerate(file.message_type):
        message(msg, file.package, (FDP.MESSAGE_TYPE_FIELD_NUMBER, i))
    for i, enum in enumerate(file.enum_type):
        found[f"{file.package}.{enum.name}"] = by_path.get((FDP.ENUM_TYPE_FIELD_NUMBER, i), "")
    for i, service in enumerate(file.service):
        full = f"{file.package}.{service.name}"
        found[full] = by_path.get((FDP.SERVICE_FIELD_NUMBER, i), "")
        for j, method in enumerate(service.method):
            path = (FDP.SERVICE_FIELD_NUMBER, i, SDP.METHOD_FIELD_NUMBER, j)
            found[f"{full}.{method.name}"] = by_path.get(path, "")
    return {name: text for name, text in found.items() if text}


def load_api(path: Path = DEFAULT_DESCRIPTOR_SET) -> ApiDescription:
    """Read the descriptor set at ``path`` and resolve its services in the default pool.

    :raises FileNotFoundError: when the set is missing (run ``make proto``).
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make proto` first")
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    pool = descriptor_pool.Default()
    services: list[ServiceDescriptor] = []
    comments: dict[str, str] = {}
    for file in sorted(fds.file, key=lambda f: f.name):
        if not file.name.startswith(_OWN_PREFIX):
            continue
        comments.update(_collect_comments(file))
        if not file.service:
            continue
        importlib.import_module(_module_name(file.name))
        for service in file.service:
            services.append(pool.FindServiceByName(f"{file.package}.{service.name}"))
    logger.debug("loaded %d services from %s", len(services), path)
    return ApiDescription(services, comments)
