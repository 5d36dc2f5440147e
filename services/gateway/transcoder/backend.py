"""Generic gRPC calls to the backend that serves a method, by its descriptor.

The gateway has no stubs: a call is ``channel.unary_unary(path, serializer, deserializer)``
with the request and response classes of the method's descriptor, so any annotated RPC is
callable without gateway code. The backend is chosen by the proto package
(``spaces.<svc>.v1`` → ``SPACES_<SVC>_ADDR``); RPCs that name a media node
(``mediaNodes/{node}/...``) go where the :class:`BackendRouter`'s node hook says.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from services.common.clients import CallIdentity, create_channel
from services.common.settings import CommonSettings
from services.gateway.binding import message_class

logger = logging.getLogger(__name__)

__all__ = ["Backend", "BackendRouter", "NodeResolver", "addresses_from_settings"]

_PACKAGE = re.compile(r"^spaces\.([a-z0-9_]+)\.v\d+$")
_STREAM_WITHOUT_DEADLINE_S = 24 * 3600.0
"""The deadline of a stream the caller gave none: a day, i.e. none in practice."""

_NODE_NAME = re.compile(r"^mediaNodes/([^/]+)(/|$)")

NodeResolver = Callable[[str], Awaitable[str | None]]
"""Returns the gRPC address of a media node by id, or None to use the media address."""


def addresses_from_settings(settings: CommonSettings) -> dict[str, str]:
    """Backend address by service short name (``rooms`` → ``SPACES_ROOMS_ADDR``)."""
    return {
        name: str(getattr(settings, f"{name}_addr"))
        for name in ("identity", "rooms", "media", "notify", "payments")
    }


def _service_of(method: MethodDescriptor) -> str:
    package = method.containing_service.file.package
    match = _PACKAGE.match(package)
    if match is None:
        raise LookupError(f"{package} is not a spaces.<service>.v<n> package")
    return match.group(1)


class BackendRouter:
    """Picks the address serving a call.

    :param addresses: address by service short name.
    :param node_resolver: address of a media node by id; ``None`` sends node-scoped calls
        to the media address (one media process, or a load balancer in front of all).
    """

    def __init__(
        self, addresses: Mapping[str, str], node_resolver: NodeResolver | None = None
    ) -> None:
        self._addresses = dict(addresses)
        self._node_resolver = node_resolver

    def set_node_resolver(self, resolver: NodeResolver | None) -> None:
        """Plug in (or remove) the media node registry."""
        self._node_resolver = resolver

    async def address(self, method: MethodDescriptor, path_params: Mapping[str, str]) -> str:
        """The address for ``method`` called with these path variables.

        :raises LookupError: when no backend serves the method's package.
        """
        service = _service_of(method)
        if self._node_resolver is not None:
            for value in path_params.values():
                match = _NODE_NAME.match(value)
                if match:
                    node_address = await self._node_resolver(match.group(1))
                    if node_address:
                        return node_address
        try:
            return self._addresses[service]
        except KeyError:
            raise LookupError(f"no address configured for {service}") from None


class Backend:
    """Channels to the backends (one per address, opened lazily) and generic calls.

    :param router: picks addresses.
    :param idempotent_methods: ``pkg.Service/Method`` retried on UNAVAILABLE (the reads).
    """

    def __init__(self, router: BackendRouter, idempotent_methods: Sequence[str] = ()) -> None:
        self.router = router
        self._idempotent = list(idempotent_methods)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to ``address``."""
        channel = self._channels.get(address)
        if channel is None:
            # The gateway forwards the user's own token (set per call in metadata) and
            # never sends a service token of its own.
            channel = create_channel(
                address, idempotent_methods=self._idempotent, identity=CallIdentity.NONE
            )
            self._channels[address] = channel
        return channel

    async def unary(
        self,
        method: MethodDescriptor,
        request: Message,
        *,
        address: str,
        metadata: Iterable[tuple[str, str]],
        timeout: float | None,
    ) -> tuple[Message, grpc.aio.Metadata | None]:
        """Call a unary method; return its response and initial metadata.

        :raises grpc.RpcError: the backend's failure.
        """
        callable_ = self.channel(address).unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=_serialize,
            response_deserializer=message_class(method.output_type).FromString,
        )
        call: Any = callable_(request, metadata=tuple(metadata), timeout=timeout)
        response: Message = await call
        return response, await call.initial_metadata()

    def stream(
        self,
        method: MethodDescriptor,
        request: Message,
        *,
        address: str,
        metadata: Iterable[tuple[str, str]],
        timeout: float | None,
    ) -> grpc.aio.UnaryStreamCall[Message, Message]:
        """Start a server-streaming call; the caller reads it and cancels it when done."""
        callable_ = self.channel(address).unary_stream(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=_serialize,
            response_deserializer=message_class(method.output_type).FromString,
        )
        # No timeout means the stream lives as long as its client: say so explicitly, or the
        # channel's default deadline (meant for unary calls) would end it after seconds.
        call: grpc.aio.UnaryStreamCall[Message, Message] = callable_(
            request,
            metadata=tuple(metadata),
            timeout=timeout if timeout is not None else _STREAM_WITHOUT_DEADLINE_S,
        )
        return call

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
