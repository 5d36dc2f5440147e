"""Signed tokens rooms hands out: join links and page tokens.

Both are ``<base64url payload>.<base64url HMAC-SHA256>`` with a key every replica shares,
so any replica can check what another issued, and nobody can forge or alter one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument

logger = logging.getLogger(__name__)

__all__ = ["JoinLinks", "PageTokens", "moment_of", "time_key"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def time_key(moment: datetime) -> int:
    """A moment as a page token's time key: microseconds since the epoch (exact for
    PostgreSQL's timestamps)."""
    return (moment - _EPOCH) // _MICROSECOND


def moment_of(key: int) -> datetime:
    """The moment a :func:`time_key` stands for."""
    return _EPOCH + key * _MICROSECOND


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Signer:
    def __init__(self, key: bytes, purpose: str) -> None:
        # One key, separate sub-keys per purpose: a page token never passes as a join link.
        self._key = hmac.new(key, purpose.encode(), hashlib.sha256).digest()

    def sign(self, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return f"{body}.{_b64(mac)}"

    def open(self, token: str) -> dict[str, Any] | None:
        body, _, mac = token.partition(".")
        if not body or not mac:
            return None
        expected = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(expected, _unb64(mac)):
                return None
            payload = json.loads(_unb64(body))
        except (binascii.Error, ValueError):
            return None
        return payload if isinstance(payload, dict) else None


class JoinLinks:
    """Issues and checks join links.

    :param key: the shared secret.
    :param base_uri: the shareable URL's base.
    """

    def __init__(self, key: bytes, base_uri: str) -> None:
        self._signer = _Signer(key, "join-link")
        self._base_uri = base_uri

    def issue(self, space_id: str, ttl: timedelta, now: datetime) -> tuple[str, str, datetime]:
        """Return (token, uri, expire_time)."""
        expires = now + ttl
        token = self._signer.sign({"s": space_id, "e": int(expires.timestamp())})
        return (
            token,
            f"{self._base_uri}?token={token}",
            datetime.fromtimestamp(int(expires.timestamp()), UTC),
        )

    def check(self, token: str, space_id: str, now: datetime) -> None:
        """Accept a link for ``space_id``.

        :raises InvalidArgument: JOIN_LINK_INVALID (malformed, forged, other Space).
        :raises FailedPrecondition: JOIN_LINK_EXPIRED.
        """
        payload = self._signer.open(token)
        if payload is None or payload.get("s") != space_id or not isinstance(payload.get("e"), int):
            raise InvalidArgument("the join link is not valid", reason="JOIN_LINK_INVALID")
        if payload["e"] <= now.timestamp():
            raise FailedPrecondition("the join link expired", reason="JOIN_LINK_EXPIRED")


class PageTokens:
    """Opaque page tokens bound to their query.

    :param key: the shared secret.
    """

    def __init__(self, key: bytes) -> None:
        self._signer = _Signer(key, "page-token")

    def issue_after(self, query: str, key: Sequence[int | str], now: datetime) -> str:
        """A token for the page after position ``key`` (a keyset position) of ``query``."""
        return self._signer.sign({"q": query, "k": list(key), "t": int(now.timestamp())})

    def after(
        self, token: str, query: str, now: datetime, max_age: timedelta | None
    ) -> tuple[int, int, str] | None:
        """The position a keyset token names (None for no token: the first page).

        :raises InvalidArgument: PAGE_TOKEN_INVALID (malformed, forged, other query, a
            token of the offset paging this replaced, too old).
        """
        if not token:
            return None
        payload = self._open(token, query, now, max_age)
        key = payload.get("k")
        if (
            not isinstance(key, list)
            or len(key) != 3
            or not all(type(part) is int for part in key[:2])
            or not isinstance(key[2], str)
        ):
            raise _invalid()
        return int(key[0]), int(key[1]), str(key[2])

    def _open(
        self, token: str, query: str, now: datetime, max_age: timedelta | None
    ) -> dict[str, Any]:
        payload = self._signer.open(token)
        if payload is None or payload.get("q") != query:
            raise _invalid()
        issued = payload.get("t", 0)
        if type(issued) is not int:
            raise _invalid()
        if max_age is not None and now.timestamp() - issued > max_age.total_seconds():
            raise _invalid()
        return payload


def _invalid() -> InvalidArgument:
    return InvalidArgument("page_token is not valid here", reason="PAGE_TOKEN_INVALID")
