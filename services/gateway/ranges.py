"""HTTP Range requests (RFC 9110 §14) over byte-streaming RPCs such as ReadRecording.

A byte-streaming RPC takes ``int64 offset`` and ``int64 length`` (0 = to the end) and
streams messages with ``int64 offset`` and ``bytes data``; its first message carries the
file's metadata in a message field holding ``int64 size_bytes`` and ``string format`` (the
MIME type). That first message lets the gateway send 206 and ``Content-Range`` before any
data flows. Only single ranges are served; a multi-range or malformed header is ignored
(the whole file, 200), as RFC 9110 allows.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

logger = logging.getLogger(__name__)

__all__ = ["ByteRange", "file_info", "is_byte_stream", "parse_range"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class ByteRange:
    """One range of a Range header.

    :ivar start: first byte, or None for a suffix range (``bytes=-500``).
    :ivar end: last byte (inclusive), or None for "to the end".
    :ivar suffix: the suffix length of ``bytes=-N``.
    """

    start: int | None
    end: int | None
    suffix: int = 0

    def resolve(self, size: int) -> tuple[int, int] | None:
        """``(first, last)`` byte within a file of ``size`` bytes, or None if unsatisfiable."""
        if self.start is None:
            if self.suffix <= 0 or size == 0:
                return None
            return max(0, size - self.suffix), size - 1
        if self.start >= size:
            return None
        last = size - 1 if self.end is None else min(self.end, size - 1)
        return self.start, last


def parse_range(header: str | None) -> ByteRange | None:
    """The single range of a ``Range`` header; None when absent, multiple or malformed."""
    if not header:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:
        return ByteRange(None, None, suffix=int(last))
    start = int(first)
    end = int(last) if last else None
    if end is not None and end < start:
        return None
    return ByteRange(start, end)


def _has(message: Descriptor, name: str, kind: int) -> bool:
    field = message.fields_by_name.get(name)
    return field is not None and field.type == kind


def _metadata_field(response: Descriptor) -> FieldDescriptor | None:
    for field in response.fields:
        if field.message_type is not None and _has(
            field.message_type, "size_bytes", FieldDescriptor.TYPE_INT64
        ):
            return field
    return None


def is_byte_stream(method: MethodDescriptor) -> bool:
    """Whether ``method`` follows the byte-streaming convention above."""
    request, response = method.input_type, method.output_type
    return (
        bool(method.server_streaming)
        and _has(request, "offset", FieldDescriptor.TYPE_INT64)
        and _has(request, "length", FieldDescriptor.TYPE_INT64)
        and _has(response, "offset", FieldDescriptor.TYPE_INT64)
        and _has(response, "data", FieldDescriptor.TYPE_BYTES)
        and _metadata_field(response) is not None
    )


def file_info(first: Message) -> tuple[int, str]:
    """``(size, content type)`` from the first message of a byte stream."""
    descriptor: Descriptor = first.DESCRIPTOR  # type: ignore[assignment]
    field = _metadata_field(descriptor)
    if field is None:
        return 0, DEFAULT_CONTENT_TYPE
    metadata = getattr(first, field.name)
    size = int(metadata.size_bytes)
    content_type = str(getattr(metadata, "format", "") or DEFAULT_CONTENT_TYPE)
    return size, content_type
