"""Resume tokens: opaque, unforgeable pointers to a position in one Space's event order.

A token is URL-safe base64 (unpadded) of a version byte, the sequence number (8 bytes, big
endian) and a truncated HMAC-SHA256 over the Space id and the sequence. The MAC binds the
token to its Space, so a token of another Space (or a hand-edited one) is refused as
RESUME_TOKEN_INVALID instead of silently skipping events.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import struct

from services.common.errors import InvalidArgument

logger = logging.getLogger(__name__)

__all__ = ["ResumeTokens"]

_VERSION = 1
_MAC_BYTES = 12
_LAYOUT = struct.Struct(">BQ")
_TOKEN_BYTES = _LAYOUT.size + _MAC_BYTES
# Used when no secret is configured: tokens stay bound to their Space, just not secret.
_DEFAULT_KEY = b"spaces.rooms.live.resume-token.v1"


class ResumeTokens:
    """Mints and checks resume tokens.

    :param secret: HMAC key shared by every replica; ``None`` for a fixed default key.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self._key = secret or _DEFAULT_KEY

    def encode(self, space_id: str, seq: int) -> str:
        """Return the token that resumes ``space_id`` right after event ``seq``."""
        head = _LAYOUT.pack(_VERSION, seq)
        raw = head + self._mac(space_id, head)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def decode(self, space_id: str, token: str) -> int:
        """Return the sequence ``token`` points after.

        :raises InvalidArgument: RESUME_TOKEN_INVALID when the token is malformed or was
            minted for another Space.
        """
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise _invalid("resume_token is not valid base64") from None
        if len(raw) != _TOKEN_BYTES:
            raise _invalid("resume_token has the wrong length")
        head, mac = raw[: _LAYOUT.size], raw[_LAYOUT.size :]
        version, seq = _LAYOUT.unpack(head)
        if version != _VERSION:
            raise _invalid("resume_token has an unknown version")
        if not hmac.compare_digest(mac, self._mac(space_id, head)):
            raise _invalid("resume_token belongs to another Space or was altered")
        return int(seq)

    def _mac(self, space_id: str, head: bytes) -> bytes:
        digest = hmac.new(self._key, space_id.encode() + b"\x00" + head, hashlib.sha256)
        return digest.digest()[:_MAC_BYTES]


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(
        message,
        reason="RESUME_TOKEN_INVALID",
        field_violations=[("resume_token", message)],
    )
