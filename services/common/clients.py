"""Channels for calling other Spaces services.

Every outgoing call:

* has a deadline: the caller's ``timeout``, or the channel's default, cut down to what is
  left of the RPC being served (:func:`services.common.context.time_remaining`), so a chain
  of calls never outlives the request that started it;
* carries ``x-request-id`` of the current call, so logs of all hops share one id;
* carries a bearer token: this service's own token (:class:`CallIdentity.SERVICE`, the
  default) or the current user's token (:class:`CallIdentity.FORWARD_USER`, so the callee
  applies the user's permissions); an ``authorization`` entry set by the caller wins;
* is traced (OpenTelemetry aio client instrumentation).

Retries live in the channel's service config, only on UNAVAILABLE, and only for the methods
a service names as idempotent (a retried non-idempotent write could apply twice). A
service lists them next to its client, e.g. rooms calling identity::

    IDENTITY_IDEMPOTENT = [
        "spaces.identity.v1.IdentityService/GetUser",
        "spaces.identity.v1.IdentityService/CheckHostEligibility",
    ]
    channel = create_channel(settings.identity_addr, idempotent_methods=IDENTITY_IDEMPOTENT,
                             token_issuer=issuer)

A bare service name (``"spaces.identity.v1.IdentityService"``) makes every method of that
service retryable; use it only for read-only services. Writes that carry an idempotency key
(``request_id``) are idempotent and may be listed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from services.common import context
from services.common.auth import ServiceTokenIssuer
from services.common.interceptors.auth import AUTHORIZATION_HEADER
from services.common.interceptors.request_context import REQUEST_ID_HEADER
from services.common.telemetry import client_tracing_interceptors

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "CallIdentity",
    "OutgoingCallInterceptor",
    "call_as",
    "create_channel",
    "retry_service_config",
]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class CallIdentity(StrEnum):
    """Whose token an outgoing call carries."""

    SERVICE = "service"
    """This service's own token (needs a :class:`ServiceTokenIssuer`)."""
    FORWARD_USER = "forward_user"
    """The token the current user called us with; the service token when there is none."""
    NONE = "none"
    """No token (public methods)."""


_identity_override: ContextVar[CallIdentity | None] = ContextVar(
    "spaces_call_identity", default=None
)


@contextmanager
def call_as(identity: CallIdentity) -> Iterator[None]:
    """Make calls inside the ``with`` block use ``identity``, whatever their channel's default.

    Example: ``with call_as(CallIdentity.FORWARD_USER): await stub.GetSpace(...)``.
    """
    reset = _identity_override.set(identity)
    try:
        yield
    finally:
        _identity_override.reset(reset)


def retry_service_config(idempotent_methods: Sequence[str], *, max_attempts: int = 4) -> str:
    """Return the JSON service config retrying ``idempotent_methods`` on UNAVAILABLE.

    :param idempotent_methods: ``"pkg.Service/Method"`` or ``"pkg.Service"`` (all methods).
    :param max_attempts: attempts including the first (gRPC caps it at 5).
    """
    names: list[dict[str, str]] = []
    for entry in idempotent_methods:
        service, _, method = entry.strip("/").partition("/")
        if not service:
            raise ValueError(f"not a method or service name: {entry!r}")
        names.append({"service": service, "method": method} if method else {"service": service})
    config: dict[str, Any] = {
        # A target of several replicas (a multi-address target, or DNS of a headless
        # Service) spreads calls over all of them and skips the ones that are down;
        # gRPC's default pick_first would send everything to the first.
        "loadBalancingConfig": [{"round_robin": {}}],
        # Stop retrying when more than a tenth of calls fail, so retries cannot turn an
        # overloaded dependency into a retry storm.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        "methodConfig": [],
    }
    if names:
        config["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(config)


if TYPE_CHECKING:
    # The stubs make these generic; at run time the classes are not subscriptable.
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor


class OutgoingCallInterceptor:
    """Adds the deadline, request id and bearer token to every outgoing call.

    grpc.aio files an interceptor under the FIRST call kind it is an instance of, so one
    object cannot serve all four kinds: :meth:`for_all_kinds` returns one adapter per kind
    sharing this object's logic.

    :param token_issuer: mints this service's token; ``None`` sends none of its own.
    :param identity: whose token calls carry unless :func:`call_as` says otherwise.
    :param default_timeout_s: deadline of calls that set none.
    """

    def __init__(
        self,
        *,
        token_issuer: ServiceTokenIssuer | None,
        identity: CallIdentity,
        default_timeout_s: float,
    ) -> None:
        self._issuer = token_issuer
        self._identity = identity
        self._default_timeout_s = default_timeout_s

    def _token(self) -> str | None:
        identity = _identity_override.get() or self._identity
        if identity is CallIdentity.NONE:
            return None
        if identity is CallIdentity.FORWARD_USER:
            principal = context.optional_principal()
            token = context.current_token()
            if principal is not None and principal.is_user and token:
                return token
        return self._issuer.token() if self._issuer is not None else None

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        timeout = details.timeout if details.timeout is not None else self._default_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
        if REQUEST_ID_HEADER not in metadata:
            metadata.add(
                REQUEST_ID_HEADER, context.current_request_id() or context.new_request_id()
            )
        if AUTHORIZATION_HEADER not in metadata:
            token = self._token()
            if token:
                metadata.add(AUTHORIZATION_HEADER, f"Bearer {token}")
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )

    def for_all_kinds(self) -> list[Any]:
        """One interceptor per call kind, all adding what :meth:`details` adds."""
        return [
            _UnaryUnaryOutgoing(self),
            _UnaryStreamOutgoing(self),
            _StreamUnaryOutgoing(self),
            _StreamStreamOutgoing(self),
        ]


class _UnaryUnaryOutgoing(_UnaryUnary):
    def __init__(self, outgoing: OutgoingCallInterceptor) -> None:
        self._outgoing = outgoing

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._outgoing.details(details), request)


class _UnaryStreamOutgoing(_UnaryStream):
    def __init__(self, outgoing: OutgoingCallInterceptor) -> None:
        self._outgoing = outgoing

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._outgoing.details(details), request)


class _StreamUnaryOutgoing(_StreamUnary):
    def __init__(self, outgoing: OutgoingCallInterceptor) -> None:
        self._outgoing = outgoing

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._outgoing.details(details), request_iterator)


class _StreamStreamOutgoing(_StreamStream):
    def __init__(self, outgoing: OutgoingCallInterceptor) -> None:
        self._outgoing = outgoing

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._outgoing.details(details), request_iterator)


def create_channel(
    target: str,
    *,
    idempotent_methods: Sequence[str] = (),
    token_issuer: ServiceTokenIssuer | None = None,
    identity: CallIdentity = CallIdentity.SERVICE,
    default_timeout_s: float = 5.0,
    max_attempts: int = 4,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """Open an insecure (in-cluster) aio channel to another Spaces service.

    :param target: ``host:port`` (e.g. ``settings.identity_addr``).
    :param idempotent_methods: methods retried on UNAVAILABLE; see the module docs.
    :param token_issuer: this service's token issuer.
    :param identity: whose token calls carry by default.
    :param default_timeout_s: deadline of calls that set none.
    :param max_attempts: attempts of a retried call, the first included.
    :param options: extra gRPC channel arguments.
    """
    channel_options: list[tuple[str, Any]] = [
        (
            "grpc.service_config",
            retry_service_config(idempotent_methods, max_attempts=max_attempts),
        ),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Notice dead peers on idle connections (e.g. a node that vanished) within ~40 s.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        *options,
    ]
    interceptors: list[Any] = [
        *OutgoingCallInterceptor(
            token_issuer=token_issuer, identity=identity, default_timeout_s=default_timeout_s
        ).for_all_kinds(),
        *client_tracing_interceptors(),
    ]
    return grpc.aio.insecure_channel(target, options=channel_options, interceptors=interceptors)
