"""Pieces of log-in that need no server: client addresses and password hashing."""

from __future__ import annotations

import argon2
import pytest

from services.identity.passwords import PasswordHasher
from services.identity.throttle import client_address


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("ipv4:10.0.0.7:51234", None, False, "10.0.0.7"),
        ("ipv6:[2001:db8::1]:443", None, False, "2001:db8::1"),
        ("unix:/tmp/sock", None, False, "unix:/tmp/sock"),
        (None, None, False, "unknown"),
        ("ipv4:10.0.0.7:1", "203.0.113.9, 10.0.0.1", True, "203.0.113.9"),
        ("ipv4:10.0.0.7:1", "203.0.113.9", False, "10.0.0.7"),  # forged by a client
        ("ipv4:10.0.0.7:1", " ", True, "10.0.0.7"),
    ],
)
def test_client_address(
    peer: str | None, forwarded: str | None, trusted: bool, expected: str
) -> None:
    assert client_address(peer, forwarded, trusted) == expected


CHEAP = {"time_cost": 1, "memory_cost_kib": 1024}


async def test_passwords_hash_with_argon2id_and_verify() -> None:
    hasher = PasswordHasher(**CHEAP)
    encoded = await hasher.hash("correct horse")
    assert encoded.startswith("$argon2id$")
    assert await hasher.verify(encoded, "correct horse")
    assert not await hasher.verify(encoded, "wrong horse")
    assert not await hasher.verify("not a hash", "correct horse")
    assert not hasher.needs_rehash(encoded)
    assert PasswordHasher(time_cost=2, memory_cost_kib=1024).needs_rehash(encoded)


async def test_unknown_handles_cost_a_real_verification() -> None:
    hasher = PasswordHasher(**CHEAP)
    assert await hasher.verify_unknown("anything") is False
    # The decoy is a real hash with the current parameters, so checking it costs what
    # checking a real account's password does.
    decoy = hasher._decoy
    assert argon2.extract_parameters(decoy) == argon2.extract_parameters(await hasher.hash("x"))
