"""What every backend call from the gateway carries: token, request id and deadline.

* ``Authorization`` passes through unchanged as ``authorization`` metadata; the services
  verify it (the gateway never decides who may do what).
* ``X-Request-Id`` is taken from the client when it is a short printable token, else minted;
  it goes to the backend as ``x-request-id`` and back to the client in the response.
* The deadline is the gateway's default, shortened by ``X-Request-Timeout`` (a gRPC
  ``grpc-timeout`` value such as ``500m`` or ``2S``, or plain seconds such as ``2.5``);
  a client can never lengthen it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from services.common import context
from services.gateway.errors import GatewayError

logger = logging.getLogger(__name__)

__all__ = [
    "REQUEST_ID_HEADER",
    "REQUEST_TIMEOUT_HEADER",
    "CallOptions",
    "bearer_token",
    "parse_timeout",
    "request_id_of",
]

REQUEST_ID_HEADER = "x-request-id"
REQUEST_TIMEOUT_HEADER = "x-request-timeout"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_SECONDS = re.compile(r"^\d{1,8}(\.\d{1,9})?$")
# What gRPC metadata may carry: visible ASCII and spaces. Anything else in Authorization
# cannot be forwarded, and no valid token contains it.
_AUTHORIZATION = re.compile(r"^[\x21-\x7e]+( [\x21-\x7e]+)*$")
_UNIT_S = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if it is one."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def request_id_of(given: str | None) -> str:
    """The client's request id if acceptable, else a fresh one."""
    if given and _VALID_REQUEST_ID.match(given):
        return given
    return context.new_request_id()


def parse_timeout(value: str | None, default_s: float | None) -> float | None:
    """The call's timeout: ``default_s`` cut down to the header's value.

    :raises GatewayError: INVALID_ARGUMENT for a malformed or zero header.
    """
    if value is None:
        return default_s
    text = value.strip()
    match = _GRPC_TIMEOUT.match(text)
    if match:
        seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    elif _SECONDS.match(text):
        seconds = float(text)
    else:
        raise GatewayError.bad_request(
            "X-Request-Timeout must be like 500m, 2S or 2.5 (seconds)",
            field="X-Request-Timeout",
            reason="INVALID_TIMEOUT",
        )
    if seconds <= 0:
        raise GatewayError.bad_request(
            "X-Request-Timeout must be positive",
            field="X-Request-Timeout",
            reason="INVALID_TIMEOUT",
        )
    return seconds if default_s is None else min(seconds, default_s)


@dataclass(frozen=True)
class CallOptions:
    """Metadata and deadline of one backend call.

    :ivar request_id: the request id.
    :ivar token: the bearer token, if the client sent one.
    :ivar authorization: the Authorization value forwarded as is.
    :ivar timeout_s: seconds until the deadline; ``None`` for none (long streams).
    """

    request_id: str
    token: str | None
    authorization: str | None
    timeout_s: float | None

    def metadata(self) -> list[tuple[str, str]]:
        """The gRPC metadata to send."""
        found = [(REQUEST_ID_HEADER, self.request_id)]
        if self.authorization:
            found.append(("authorization", self.authorization))
        return found

    @classmethod
    def from_headers(
        cls,
        headers: Mapping[str, str],
        *,
        request_id: str,
        default_timeout_s: float | None,
        token: str | None = None,
    ) -> CallOptions:
        """Build from request headers (``token`` overrides Authorization, for WebSockets)."""
        authorization = headers.get("authorization")
        if token is not None:
            authorization = f"Bearer {token}"
        if authorization is not None and not _AUTHORIZATION.match(authorization):
            raise GatewayError(
                grpc.StatusCode.UNAUTHENTICATED,
                "malformed authorization header",
                reason="INVALID_TOKEN",
            )
        return cls(
            request_id=request_id,
            token=bearer_token(authorization),
            authorization=authorization,
            timeout_s=parse_timeout(headers.get(REQUEST_TIMEOUT_HEADER), default_timeout_s),
        )
