"""Authentication by the ``(spaces.common.v1.access)`` option of the method being called.

The rule lives in the proto next to the RPC, read here from the method's descriptor in the
default pool; an RPC without the option (or not in the pool) is ACCESS_USER, so forgetting
it never opens an RPC. Health and reflection are public.

=============  ============  ==================  =================
access         no token      valid user token    valid service token
=============  ============  ==================  =================
PUBLIC         anonymous     user                service
USER           UNAUTHENTIC.  user                service
INTERNAL       UNAUTHENTIC.  PERMISSION_DENIED   service
=============  ============  ==================  =================

A token that is sent is always verified: a bad one is UNAUTHENTICATED even on a public RPC,
so a client learns its session is broken instead of being silently served as anonymous.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache

from google.protobuf import descriptor_pool
from spaces.common.v1 import options_pb2

from services.common import context
from services.common.auth import Principal, TokenVerifier
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.interceptors.base import MethodName, ScopedServerInterceptor, ServerCall

logger = logging.getLogger(__name__)

__all__ = ["AUTHORIZATION_HEADER", "AuthInterceptor", "access_of"]

AUTHORIZATION_HEADER = "authorization"


@lru_cache(maxsize=1024)
def access_of(method: MethodName) -> options_pb2.Access.ValueType:
    """Return the access rule of ``method``: its option, or ACCESS_USER when unset/unknown."""
    if method.is_infrastructure:
        return options_pb2.ACCESS_PUBLIC
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(method.qualified)
    except KeyError:
        logger.warning("%s is not in the descriptor pool; treating it as ACCESS_USER", method.full)
        return options_pb2.ACCESS_USER
    access = descriptor.GetOptions().Extensions[options_pb2.access]
    return access if access != options_pb2.ACCESS_UNSPECIFIED else options_pb2.ACCESS_USER


class AuthInterceptor(ScopedServerInterceptor):
    """Verifies the bearer token, applies the method's access rule and binds the principal.

    :param verifier: checks tokens.
    """

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    def scope(self, call: ServerCall) -> AbstractAsyncContextManager[None]:
        return self._authenticate(call)

    @asynccontextmanager
    async def _authenticate(self, call: ServerCall) -> AsyncIterator[None]:
        access = access_of(call.method)
        token = _bearer_token(call)
        principal: Principal | None = None
        if token is not None:
            principal = await self._verifier.verify(token)
        if access != options_pb2.ACCESS_PUBLIC and principal is None:
            raise Unauthenticated("authentication required", reason="UNAUTHENTICATED")
        if access == options_pb2.ACCESS_INTERNAL and principal is not None and principal.is_user:
            raise PermissionDenied(
                "this method is only for Spaces services", reason="INTERNAL_ONLY"
            )
        with context.bind_principal(principal, token):
            yield


def _bearer_token(call: ServerCall) -> str | None:
    header = call.metadata.get(AUTHORIZATION_HEADER)
    if header is None:
        return None
    if not isinstance(header, str):
        raise Unauthenticated("malformed authorization header", reason="INVALID_TOKEN")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("authorization must be 'Bearer <token>'", reason="INVALID_TOKEN")
    return token
