"""Who is calling: user access tokens, service tokens and the :class:`Principal` they yield.

Two kinds of bearer token reach a service:

* **User access tokens**: JWTs that identity signs with an asymmetric key (EdDSA/Ed25519 or
  ES256) named by the ``kid`` header, published as a JWKS. Claims: ``iss`` =
  ``spaces-identity``, ``aud`` = ``spaces``, ``sub`` = user id, ``exp``, ``iat``, ``jti``.
  Any service verifies them with only the public keys, got from a :class:`JwksSource`.
* **Service tokens**: short-lived HS256 JWTs keyed by ``SPACES_INTERNAL_SECRET``, ``sub`` =
  ``service:<name>``, ``aud`` = ``spaces-internal``; minted by :class:`ServiceTokenIssuer`.

The algorithm in a token's header only picks which of these two checks runs; each check pins
its own algorithm list, so neither ``alg=none`` nor an HS256 token "signed" with a public key
(the classic algorithm-confusion attack) can pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import jwt
from pydantic import SecretStr

from services.common.errors import Unauthenticated, Unavailable

logger = logging.getLogger(__name__)

__all__ = [
    "ACCESS_TOKEN_AUDIENCE",
    "ACCESS_TOKEN_ISSUER",
    "SERVICE_TOKEN_AUDIENCE",
    "USER_TOKEN_ALGORITHMS",
    "JwksSource",
    "Principal",
    "PrincipalKind",
    "ServiceTokenIssuer",
    "StaticJwksSource",
    "TokenVerifier",
]

ACCESS_TOKEN_ISSUER = "spaces-identity"
ACCESS_TOKEN_AUDIENCE = "spaces"
SERVICE_TOKEN_AUDIENCE = "spaces-internal"
SERVICE_SUBJECT_PREFIX = "service:"
USER_TOKEN_ALGORITHMS = frozenset({"EdDSA", "ES256"})
SERVICE_TOKEN_ALGORITHM = "HS256"


class PrincipalKind(StrEnum):
    """Whether a caller is a person or another Spaces service."""

    USER = "user"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of an RPC.

    :ivar kind: user or service.
    :ivar user_id: the user's id (``sub`` of an access token) when ``kind`` is USER.
    :ivar service_name: the calling service (``identity``, ``rooms``...) when SERVICE.
    :ivar claims: every verified claim of the token.
    """

    kind: PrincipalKind
    user_id: str | None = None
    service_name: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def user(cls, user_id: str, claims: Mapping[str, Any] | None = None) -> Principal:
        """Build a user principal."""
        return cls(PrincipalKind.USER, user_id=user_id, claims=dict(claims or {}))

    @classmethod
    def service(cls, name: str, claims: Mapping[str, Any] | None = None) -> Principal:
        """Build a service principal."""
        return cls(PrincipalKind.SERVICE, service_name=name, claims=dict(claims or {}))

    @property
    def is_user(self) -> bool:
        """True for a signed-in user."""
        return self.kind is PrincipalKind.USER

    @property
    def is_service(self) -> bool:
        """True for another Spaces service."""
        return self.kind is PrincipalKind.SERVICE


class JwksSource(Protocol):
    """Where the public keys that verify user access tokens come from.

    Implementations just fetch; :class:`TokenVerifier` caches the result and asks again
    (rate-limited) when a token names a key it does not know, which is how key rotation
    reaches every service.
    """

    async def get_keys(self) -> dict[str, jwt.PyJWK]:
        """Return the current verification keys by ``kid``."""
        ...


class StaticJwksSource:
    """A :class:`JwksSource` over a JWKS document held in memory.

    Identity uses it for its own keys (calling :meth:`update` when it rotates); tests use it
    with a generated key pair.

    :param jwks: a JWKS document, ``{"keys": [{"kty": ..., "kid": ..., ...}]}``.
    """

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys: dict[str, jwt.PyJWK] = {}
        self.update(jwks)

    def update(self, jwks: Mapping[str, Any]) -> None:
        """Replace the keys with those of ``jwks``; keys without a ``kid`` are ignored."""
        keys: dict[str, jwt.PyJWK] = {}
        for entry in jwks.get("keys", []):
            kid = entry.get("kid")
            if not kid:
                logger.warning("ignoring a JWK without kid")
                continue
            keys[kid] = jwt.PyJWK.from_dict(dict(entry))
        self._keys = keys

    async def get_keys(self) -> dict[str, jwt.PyJWK]:
        """Return the keys by ``kid``."""
        return dict(self._keys)


class _KeyCache:
    """Caches a :class:`JwksSource` and refetches on unknown kids, at most once per interval."""

    def __init__(self, source: JwksSource, *, ttl_s: float, min_refresh_interval_s: float) -> None:
        self._source = source
        self._ttl_s = ttl_s
        self._min_refresh_interval_s = min_refresh_interval_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._failed = False
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """Return the key named ``kid``, or ``None`` when the source does not have it.

        :raises Unavailable: no keys could be fetched at all (identity unreachable), so a
            token cannot be judged; callers should retry rather than sign the user out.
        """
        now = time.monotonic()
        if now - self._fetched_at > self._ttl_s:
            await self._refresh(stale_before=now)
        found = self._keys.get(kid)
        if found is None and time.monotonic() - self._fetched_at >= self._min_refresh_interval_s:
            # An unknown kid usually means identity rotated its keys; ask again, but never
            # more often than the interval so forged kids cannot hammer identity.
            await self._refresh(stale_before=time.monotonic() - self._min_refresh_interval_s)
            found = self._keys.get(kid)
        if found is None and self._failed and not self._keys:
            raise Unavailable("token signing keys are unavailable", reason="JWKS_UNAVAILABLE")
        return found

    async def _refresh(self, *, stale_before: float) -> None:
        async with self._lock:
            if self._fetched_at > stale_before:
                return  # another caller refreshed while we waited for the lock
            try:
                self._keys = await self._source.get_keys()
                self._failed = False
            except Exception:
                # Keep serving with the keys we have; identity may be restarting.
                logger.exception(
                    "fetching the JWKS failed; keeping %d cached keys", len(self._keys)
                )
                self._failed = True
            self._fetched_at = time.monotonic()


class TokenVerifier:
    """Verifies bearer tokens and returns the :class:`Principal` they stand for.

    :param jwks: source of identity's public keys.
    :param internal_secret: HMAC key of service tokens; ``None`` refuses every service token.
    :param leeway_s: clock skew tolerated on ``exp``/``iat``/``nbf``.
    :param cache_ttl_s: how long fetched keys are trusted before they are fetched again.
    :param min_refresh_interval_s: least time between two fetches caused by unknown kids.
    """

    def __init__(
        self,
        jwks: JwksSource,
        internal_secret: SecretStr | str | None,
        *,
        leeway_s: float = 30.0,
        cache_ttl_s: float = 300.0,
        min_refresh_interval_s: float = 30.0,
    ) -> None:
        self._keys = _KeyCache(
            jwks, ttl_s=cache_ttl_s, min_refresh_interval_s=min_refresh_interval_s
        )
        self._secret = _secret_bytes(internal_secret)
        self._leeway_s = leeway_s

    async def verify(self, token: str) -> Principal:
        """Check ``token`` and return its principal.

        :raises Unauthenticated: reason ``TOKEN_EXPIRED`` for an expired token,
            ``INVALID_TOKEN`` for anything else wrong with it.
        :raises Unavailable: identity's keys could not be fetched (``JWKS_UNAVAILABLE``).
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _invalid("malformed token") from None
        alg = header.get("alg")
        if alg == SERVICE_TOKEN_ALGORITHM:
            return self._verify_service(token)
        if alg in USER_TOKEN_ALGORITHMS:
            return await self._verify_user(token, alg, header.get("kid"))
        raise _invalid("token algorithm not accepted")

    async def _verify_user(self, token: str, alg: str, kid: object) -> Principal:
        if not isinstance(kid, str) or not kid:
            raise _invalid("token has no key id")
        key = await self._keys.key(kid)
        if key is None:
            raise _invalid("token signed with an unknown key")
        if key.algorithm_name != alg:
            raise _invalid("token algorithm does not match its key")
        claims = self._decode(
            token,
            key.key,
            alg,
            audience=ACCESS_TOKEN_AUDIENCE,
            issuer=ACCESS_TOKEN_ISSUER,
            required=["exp", "iat", "sub", "jti", "iss", "aud"],
        )
        subject = claims["sub"]
        if (
            not isinstance(subject, str)
            or not subject
            or subject.startswith(SERVICE_SUBJECT_PREFIX)
        ):
            raise _invalid("token subject is not a user")
        return Principal.user(subject, claims)

    def _verify_service(self, token: str) -> Principal:
        if self._secret is None:
            raise _invalid("service tokens are not accepted: no internal secret configured")
        claims = self._decode(
            token,
            self._secret,
            SERVICE_TOKEN_ALGORITHM,
            audience=SERVICE_TOKEN_AUDIENCE,
            issuer=None,
            required=["exp", "iat", "sub", "aud"],
        )
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject.startswith(SERVICE_SUBJECT_PREFIX):
            raise _invalid("token subject is not a service")
        name = subject.removeprefix(SERVICE_SUBJECT_PREFIX)
        if not name:
            raise _invalid("token subject is not a service")
        return Principal.service(name, claims)

    def _decode(
        self,
        token: str,
        key: Any,
        alg: str,
        *,
        audience: str,
        issuer: str | None,
        required: list[str],
    ) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer,
                leeway=self._leeway_s,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError as error:
            # PyJWT's messages name the failed check only ("Signature verification failed").
            raise _invalid(f"invalid token: {error}") from None
        return claims


class ServiceTokenIssuer:
    """Mints this service's own tokens for calls to other services, reusing one until near expiry.

    :param service_name: this service's name (``rooms``); becomes ``sub`` = ``service:rooms``.
    :param secret: ``SPACES_INTERNAL_SECRET``.
    :param ttl_s: lifetime of a token.
    :param renew_before_s: a token is replaced once it has less than this left.
    """

    def __init__(
        self,
        service_name: str,
        secret: SecretStr | str,
        *,
        ttl_s: float = 300.0,
        renew_before_s: float = 60.0,
    ) -> None:
        key = _secret_bytes(secret)
        if key is None:
            raise ValueError("a service token issuer needs the internal secret")
        if renew_before_s >= ttl_s:
            raise ValueError("renew_before_s must be shorter than ttl_s")
        self._key = key
        self._subject = SERVICE_SUBJECT_PREFIX + service_name
        self._ttl_s = ttl_s
        self._renew_before_s = renew_before_s
        self._token = ""
        self._expires_at = 0.0

    def token(self) -> str:
        """Return a valid service token (HS256 signing is cheap: no need to be async)."""
        now = time.time()
        if now >= self._expires_at - self._renew_before_s:
            issued = int(now)
            self._expires_at = issued + self._ttl_s
            self._token = jwt.encode(
                {
                    "sub": self._subject,
                    "aud": SERVICE_TOKEN_AUDIENCE,
                    "iat": issued,
                    "exp": int(self._expires_at),
                    "jti": uuid.uuid4().hex,
                },
                self._key,
                algorithm=SERVICE_TOKEN_ALGORITHM,
            )
        return self._token


def _secret_bytes(secret: SecretStr | str | None) -> bytes | None:
    if secret is None:
        return None
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return value.encode() if value else None


def _invalid(message: str) -> Unauthenticated:
    return Unauthenticated(message, reason="INVALID_TOKEN")
