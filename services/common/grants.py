"""Media grants: the short-lived tokens rooms signs and media checks before a session opens.

A grant says "user U may open a media session in Space S on node N, with role R, publishing
or not". Rooms issues one from ``JoinSpace`` (and with every ``media_reconnect``); media
verifies it in ``Negotiate``. Both hold the same secret, ``SPACES_MEDIA_GRANT_SECRET``, so
the token is an HS256 JWT with its own audience: it can never pass as an access token or a
service token (those pin other algorithms or audiences).

Claims: ``iss`` = ``spaces-rooms``, ``aud`` = ``spaces-media``, ``sub`` = user id, ``space``
(Space id), ``role`` (``host``, ``co_host``, ``speaker``, ``listener``), ``may_publish``,
``node`` (media node id), ``jti`` (a fresh session nonce), ``iat`` and ``exp`` (about two
minutes later). Media applies later permission changes (``UpdatePermissions``) over the
grant, so a grant only has to be right at the moment it is used.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.errors import PermissionDenied

logger = logging.getLogger(__name__)

__all__ = [
    "GRANT_AUDIENCE",
    "GRANT_ISSUER",
    "MediaGrant",
    "MediaGrantSettings",
    "MediaGrantSigner",
    "MediaGrantVerifier",
]

GRANT_ISSUER = "spaces-rooms"
GRANT_AUDIENCE = "spaces-media"
_ALGORITHM = "HS256"
_MIN_SECRET_BYTES = 32


class MediaGrantSettings(BaseSettings):
    """The grant secret and lifetime rooms and media share (env prefix ``SPACES_MEDIA_GRANT_``)."""

    model_config = SettingsConfigDict(
        env_prefix="SPACES_MEDIA_GRANT_", env_file=".env", extra="ignore", frozen=True
    )

    secret: SecretStr | None = Field(
        default=None,
        description=(
            "HMAC key (at least 32 random bytes) media grants are signed with; the same value "
            "in rooms and media (SPACES_MEDIA_GRANT_SECRET). Default: unset (rooms cannot "
            "issue grants and media refuses every session)."
        ),
    )
    ttl_s: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description=(
            "Seconds a grant is accepted for new sessions (SPACES_MEDIA_GRANT_TTL_S). Default: 120."
        ),
    )


@dataclass(frozen=True)
class MediaGrant:
    """The verified content of a grant.

    :ivar space_id: the Space.
    :ivar user_id: the user it was issued to.
    :ivar role: ``host``, ``co_host``, ``speaker`` or ``listener``.
    :ivar may_publish: the user may send audio.
    :ivar node: the media node id it is for (``media-3``).
    :ivar nonce: unique id of this grant (``jti``).
    :ivar expire_time: when it stops being accepted.
    """

    space_id: str
    user_id: str
    role: str
    may_publish: bool
    node: str
    nonce: str
    expire_time: datetime


def _key(secret: SecretStr | str) -> bytes:
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    key = value.encode()
    if len(key) < _MIN_SECRET_BYTES:
        raise ValueError(f"the media grant secret needs at least {_MIN_SECRET_BYTES} bytes")
    return key


class MediaGrantSigner:
    """Issues grants (rooms).

    :param secret: ``SPACES_MEDIA_GRANT_SECRET``.
    :param ttl: how long a grant is accepted.
    """

    def __init__(self, secret: SecretStr | str, *, ttl: timedelta = timedelta(minutes=2)) -> None:
        self._key = _key(secret)
        self._ttl = ttl

    def sign(
        self,
        *,
        space_id: str,
        user_id: str,
        role: str,
        may_publish: bool,
        node: str,
        now: datetime | None = None,
    ) -> tuple[str, MediaGrant]:
        """Return a new signed grant and its content."""
        issued = now or datetime.now(UTC)
        expires = issued + self._ttl
        nonce = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "iss": GRANT_ISSUER,
            "aud": GRANT_AUDIENCE,
            "sub": user_id,
            "space": space_id,
            "role": role,
            "may_publish": may_publish,
            "node": node,
            "jti": nonce,
            "iat": int(issued.timestamp()),
            "exp": int(expires.timestamp()),
        }
        token = jwt.encode(claims, self._key, algorithm=_ALGORITHM)
        grant = MediaGrant(
            space_id=space_id,
            user_id=user_id,
            role=role,
            may_publish=may_publish,
            node=node,
            nonce=nonce,
            expire_time=datetime.fromtimestamp(int(expires.timestamp()), UTC),
        )
        return token, grant


class MediaGrantVerifier:
    """Checks grants (media).

    :param secret: ``SPACES_MEDIA_GRANT_SECRET``.
    :param leeway_s: clock skew tolerated on ``exp``/``iat``.
    """

    def __init__(self, secret: SecretStr | str, *, leeway_s: float = 5.0) -> None:
        self._key = _key(secret)
        self._leeway_s = leeway_s

    def verify(self, token: str, *, now: float | None = None) -> MediaGrant:
        """Return the grant's content.

        :raises PermissionDenied: ``GRANT_EXPIRED`` when it expired, ``GRANT_INVALID`` for
            anything else wrong with it.
        """
        options: dict[str, Any] = {
            "require": ["exp", "iat", "sub", "jti", "aud", "iss", "space", "node", "role"]
        }
        if now is not None:
            # Tests pin the clock; PyJWT reads time.time() itself otherwise.
            options["verify_exp"] = False
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                audience=GRANT_AUDIENCE,
                issuer=GRANT_ISSUER,
                leeway=self._leeway_s,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise PermissionDenied("media grant expired", reason="GRANT_EXPIRED") from None
        except jwt.InvalidTokenError as error:
            raise PermissionDenied(
                f"invalid media grant: {error}", reason="GRANT_INVALID"
            ) from None
        if now is not None and claims["exp"] + self._leeway_s < now:
            raise PermissionDenied("media grant expired", reason="GRANT_EXPIRED")
        try:
            return MediaGrant(
                space_id=str(claims["space"]),
                user_id=str(claims["sub"]),
                role=str(claims["role"]),
                may_publish=bool(claims.get("may_publish", False)),
                node=str(claims["node"]),
                nonce=str(claims["jti"]),
                expire_time=datetime.fromtimestamp(int(claims["exp"]), UTC),
            )
        except (TypeError, ValueError):
            raise PermissionDenied("invalid media grant claims", reason="GRANT_INVALID") from None
