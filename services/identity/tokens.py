"""Access tokens (JWT, EdDSA) and refresh tokens (opaque, stored hashed, one use).

A refresh token belongs to a *family* started at log-in; each use spends it and issues the
next one of the same family. Presenting a spent token again means it was stolen (or the
client raced itself), so the whole family is revoked and the user logs in again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import secrets
import uuid

import jwt

from services.common.auth import ACCESS_TOKEN_AUDIENCE, ACCESS_TOKEN_ISSUER
from services.identity.keys import ALGORITHM, SigningKey

logger = logging.getLogger(__name__)

__all__ = [
    "REFRESH_PREFIX",
    "IssuedToken",
    "hash_refresh_token",
    "issue_access_token",
    "new_refresh_token",
]

REFRESH_PREFIX = "rt_"


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    """A token and when it stops working."""

    token: str = dataclasses.field(repr=False)
    expire_time: dt.datetime


def issue_access_token(
    key: SigningKey,
    user_id: str,
    family_id: uuid.UUID,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> IssuedToken:
    """Sign a short-lived access token for ``user_id`` with ``key``.

    :param family_id: the refresh-token family (the session), sent as ``sid``.
    """
    issued = int(now.timestamp())
    expires = issued + int(ttl.total_seconds())
    claims = {
        "iss": ACCESS_TOKEN_ISSUER,
        "aud": ACCESS_TOKEN_AUDIENCE,
        "sub": user_id,
        "iat": issued,
        "exp": expires,
        "jti": uuid.uuid4().hex,
        "sid": str(family_id),
    }
    token = jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})
    return IssuedToken(token=token, expire_time=dt.datetime.fromtimestamp(expires, dt.UTC))


def new_refresh_token() -> tuple[str, bytes]:
    """Return a new refresh token and the hash to store (the token itself is never stored).

    The token is 256 random bits; its expiry lives with the hash, set by the caller (a new
    family's own, or the family's for a rotated token).
    """
    token = REFRESH_PREFIX + secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> bytes:
    """SHA-256 of a refresh token.

    A fast hash is enough here, unlike for passwords: the token is 256 random bits, so
    nobody can guess it from the hash by trying candidates; and it stays indexable.
    """
    return hashlib.sha256(token.encode()).digest()
