"""Identifiers: lower-case, URL-safe, time-ordered.

Ids sort by creation time (48 bits of milliseconds, then 80 random bits, in Crockford's
base32 alphabet lower-cased), so keyset pagination over an id column gives a stable order
that is also roughly chronological, and new rows land at the right edge of a B-tree index.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
ID_LENGTH = 26


def new_id(now_ms: int | None = None) -> str:
    """Return a new 26-character id (``^[0-9a-z]{26}$``, time-ordered)."""
    millis = int(time.time() * 1000) if now_ms is None else now_ms
    value = (millis & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(ID_LENGTH):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def id_time_ms(identifier: str) -> int:
    """Return the creation time (ms since the epoch) encoded in an id from :func:`new_id`."""
    value = 0
    for char in identifier:
        value = value << 5 | _ALPHABET.index(char)
    return value >> 80
