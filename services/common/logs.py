"""Logging set-up: one JSON object per line, enriched with the call's ids, never a secret.

Every record gets the service name, the current trace and span ids (from OpenTelemetry) and
the request id (from :mod:`services.common.context`), so a log line can be joined with its
trace. :class:`RedactionFilter` sits on the handler, so it sees records of every library,
not just ours.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from services.common import context
from services.common.settings import CommonSettings

logger = logging.getLogger(__name__)

__all__ = ["JsonFormatter", "RedactionFilter", "TextFormatter", "configure_logging", "redact"]

REDACTED = "[REDACTED]"

# Names of fields whose values are secrets wherever they appear (dict keys, extra= fields,
# key=value pairs in text). Deliberately not a bare "key": event keys and idempotency keys
# are useful in logs; key *material* is matched by the longer names.
_SECRET_NAME = re.compile(
    r"pass(word|wd|phrase)?|secret|token|authori[sz]ation|cookie|credential|"
    r"api[_-]?key|private[_-]?key|signing[_-]?key|session[_-]?key|^jwks?$",
    re.IGNORECASE,
)
_TEXT_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Authorization headers and bearer credentials in any text.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    # JWTs anywhere (three base64url segments starting with a JSON header).
    (re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # Passwords embedded in URLs: scheme://user:password@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*):[^@/\s]+@"), r"\1:" + REDACTED + "@"),
    # key=value and "key": "value" pairs whose key names a secret.
    (
        re.compile(
            r"(?i)([\"']?\b[\w-]*(?:password|passwd|secret|token|authorization|api[_-]?key|"
            r"private[_-]?key)[\w-]*[\"']?\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&}]+)"
        ),
        r"\1" + REDACTED,
    ),
]

# Card numbers (PANs): 13 to 19 digits, possibly grouped by spaces or dashes, not inside a
# longer run of digits. Only Luhn-valid ones are redacted (see _redact_card_number), so
# ordinary long numbers mostly survive. Apps send them as PurchaseTicket.payment_method, but
# a careless client puts them in a URL (query string, path), and the gateway's access log
# writes URLs whole.
_CARD_NUMBER = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = int(char)
        if index % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _redact_card_number(match: re.Match[str]) -> str:
    digits = match.group(0).replace(" ", "").replace("-", "")
    # The last four digits are what receipts show (PCI DSS allows them) and help support.
    return f"{REDACTED}{digits[-4:]}" if _luhn_valid(digits) else match.group(0)


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)


def redact(value: Any) -> Any:
    """Return ``value`` with secrets replaced, recursing into mappings and sequences."""
    if isinstance(value, str):
        for pattern, replacement in _TEXT_PATTERNS:
            value = pattern.sub(replacement, value)
        return _CARD_NUMBER.sub(_redact_card_number, value)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_NAME.search(k) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, bytes):
        return REDACTED if value.startswith(b"eyJ") else value
    return value


class RedactionFilter(logging.Filter):
    """Removes secrets from a record's message, arguments, ``extra`` fields and traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._exception_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        # Redact the rendered message: a secret can arrive through %-args of any type.
        record.msg = redact(message)
        record.args = None
        for name, value in list(vars(record).items()):
            if name in _RECORD_ATTRIBUTES:
                continue
            setattr(record, name, REDACTED if _SECRET_NAME.search(name) else redact(value))
        if record.exc_info and not record.exc_text:
            # Exception texts often carry connection strings; render and clean them here so
            # the formatter uses the cleaned text.
            record.exc_text = redact(self._exception_formatter.formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _call_fields() -> dict[str, str]:
    fields: dict[str, str] = {}
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        fields["trace_id"] = format(span_context.trace_id, "032x")
        fields["span_id"] = format(span_context.span_id, "016x")
    request_id = context.current_request_id()
    if request_id:
        fields["request_id"] = request_id
    return fields


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (timestamp, level, logger, message, ids, extras).

    :param service: the service name written into every record.
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self._service,
            **_call_fields(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and name not in entry:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local development, with the request and trace ids appended.

    :param service: the service name written into every line.
    """

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{k}={v}" for k, v in _call_fields().items() if k != "span_id")
        return f"{line} [{ids}]" if ids else line


_HANDLER_NAME = "spaces"


def configure_logging(service: str, settings: CommonSettings) -> None:
    """Send every logger's records to stderr, formatted and redacted.

    Idempotent: calling it again replaces the handler it installed before.

    :param service: the service name put into each record.
    :param settings: provides ``log_level`` and ``log_format``.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RedactionFilter())
    formatter: logging.Formatter = (
        JsonFormatter(service) if settings.log_format == "json" else TextFormatter(service)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)
