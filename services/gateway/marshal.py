"""Response messages as proto3 JSON (camelCase names, int64 as strings, enums by name)."""

from __future__ import annotations

import json
import logging
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

logger = logging.getLogger(__name__)

__all__ = ["message_dict", "message_json"]


def message_dict(message: Message, response_body: str = "") -> Any:
    """The JSON value of ``message`` (or of its ``response_body`` field).

    Fields without presence are printed even when at their default (as grpc-gateway's
    default marshaler does), so clients see ``"count": 0`` rather than a missing key.
    """
    rendered = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    if response_body:
        field = message.DESCRIPTOR.fields_by_name[response_body]
        return rendered.get(field.json_name)
    return rendered


def message_json(message: Message, response_body: str = "") -> str:
    """``message`` as compact JSON text."""
    return json.dumps(
        message_dict(message, response_body), separators=(",", ":"), ensure_ascii=False
    )
