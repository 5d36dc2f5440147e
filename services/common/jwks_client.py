"""Identity's token-signing keys, fetched over gRPC: the JwksSource of every other service.

Services verify user access tokens locally with identity's public keys; this source asks
identity for them (``IdentityService.GetJwks``, a public RPC) through a channel from
:mod:`services.common.clients`. :class:`~services.common.auth.TokenVerifier` caches what it
returns and asks again when a token names a key it has not seen, which is how a key
rotation reaches every service. No secret is shared: only public keys travel.

Typical wiring in a service's ``main.py``::

    jwks = IdentityJwksSource.connect(common.identity_addr)
    service = Service("rooms", settings, common, jwks=jwks)
    service.on_shutdown(jwks.close)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc.aio
import jwt
from spaces.identity.v1 import identity_service_pb2 as identity_pb
from spaces.identity.v1 import identity_service_pb2_grpc as identity_grpc

from services.common.auth import USER_TOKEN_ALGORITHMS
from services.common.clients import CallIdentity, call_as, create_channel

logger = logging.getLogger(__name__)

__all__ = ["GET_JWKS_METHOD", "IdentityJwksSource"]

GET_JWKS_METHOD = "spaces.identity.v1.IdentityService/GetJwks"


class IdentityJwksSource:
    """A :class:`~services.common.auth.JwksSource` backed by ``IdentityService.GetJwks``.

    :param channel: a channel to identity (from :func:`services.common.clients.create_channel`).
    :param timeout_s: deadline of one fetch.
    :param owns_channel: close the channel in :meth:`close`.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel | Callable[[], grpc.aio.Channel],
        *,
        timeout_s: float = 5.0,
        owns_channel: bool = False,
    ) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._open: Callable[[], grpc.aio.Channel] | None = None
        if isinstance(channel, grpc.aio.Channel):
            self._channel = channel
        else:
            self._open = channel
        self._timeout_s = timeout_s
        self._owns_channel = owns_channel

    @classmethod
    def connect(cls, target: str, *, timeout_s: float = 5.0) -> IdentityJwksSource:
        """A source with a channel of its own to identity at ``target`` (``host:port``).

        The channel opens at the first fetch, inside the event loop that serves: a gRPC
        aio channel belongs to the loop it was created in, and ``main`` builds the service
        before the loop runs. GetJwks is read-only, so the channel retries it on
        UNAVAILABLE (identity restarting), and sends no token: the RPC is public.
        """
        return cls(
            lambda: create_channel(
                target,
                idempotent_methods=[GET_JWKS_METHOD],
                identity=CallIdentity.NONE,
                default_timeout_s=timeout_s,
            ),
            timeout_s=timeout_s,
            owns_channel=True,
        )

    def _stub(self) -> identity_grpc.IdentityServiceAsyncStub:
        if self._channel is None:
            assert self._open is not None
            self._channel = self._open()
        return identity_grpc.IdentityServiceStub(self._channel)

    async def get_keys(self) -> dict[str, jwt.PyJWK]:
        """Fetch the published keys by ``kid``; keys this verifier cannot use are skipped.

        :raises grpc.aio.AioRpcError: identity could not be asked (the verifier then keeps
            the keys it has).
        """
        # No token: a public RPC, and a user's token forwarded here could be the very
        # token being verified.
        with call_as(CallIdentity.NONE):
            response = await self._stub().GetJwks(
                identity_pb.GetJwksRequest(), timeout=self._timeout_s
            )
        keys: dict[str, jwt.PyJWK] = {}
        for entry in response.keys:
            if not entry.kid or entry.alg not in USER_TOKEN_ALGORITHMS:
                logger.warning("skipping JWK %r with algorithm %r", entry.kid, entry.alg)
                continue
            if entry.use and entry.use != "sig":
                continue
            jwk: dict[str, Any] = {
                "kty": entry.kty,
                "crv": entry.crv,
                "x": entry.x,
                "kid": entry.kid,
                "alg": entry.alg,
                "use": entry.use or "sig",
            }
            if entry.y:
                jwk["y"] = entry.y
            try:
                keys[entry.kid] = jwt.PyJWK.from_dict(jwk)
            except jwt.PyJWKError as error:
                logger.warning("skipping unusable JWK %r: %s", entry.kid, error)
        return keys

    async def close(self) -> None:
        """Close the channel if this source opened it."""
        if self._owns_channel and self._channel is not None:
            await self._channel.close(None)
            self._channel = None
