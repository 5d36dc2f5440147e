"""Signing keys over time: rotation plans, the signer, the published set, expiry."""

from __future__ import annotations

import datetime as dt

import jwt
import pytest

from services.common.auth import StaticJwksSource, TokenVerifier
from services.identity import keys as keys_module
from services.identity.keys import KeyRing, KeySchedule, SigningKey, plan_rotation
from services.identity.tokens import hash_refresh_token, issue_access_token, new_refresh_token

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
TTL = dt.timedelta(minutes=15)
INTERVAL = 30 * DAY
LEAD = 2 * HOUR


def schedule(kid: str, activate_at: dt.datetime) -> KeySchedule:
    return KeySchedule(kid, activate_at, activate_at)


def plan(schedules: list[KeySchedule], now: dt.datetime) -> dt.datetime | None:
    return plan_rotation(schedules, now, interval=INTERVAL, lead=LEAD)


def test_the_first_key_signs_at_once() -> None:
    assert plan([], T0) == T0


def test_no_new_key_until_the_lead_before_the_interval_ends() -> None:
    keys = [schedule("a", T0)]
    assert plan(keys, T0 + INTERVAL - LEAD - HOUR) is None
    assert plan(keys, T0 + INTERVAL - LEAD) == T0 + INTERVAL
    # Checked late (every replica was down): still published a full lead before signing.
    assert plan(keys, T0 + INTERVAL + DAY) == T0 + INTERVAL + DAY + LEAD


def test_a_waiting_key_is_not_doubled() -> None:
    keys = [schedule("a", T0), schedule("b", T0 + INTERVAL)]
    assert plan(keys, T0 + INTERVAL - HOUR) is None
    # Once b signs, the next rotation is planned from b.
    assert plan(keys, T0 + INTERVAL + HOUR) is None
    assert plan(keys, T0 + 2 * INTERVAL - LEAD) == T0 + 2 * INTERVAL


def ring_at(*activations: dt.datetime) -> KeyRing:
    return KeyRing([SigningKey.generate(when - DAY, when) for when in activations], token_ttl=TTL)


def test_ring_signer_and_published_keys_over_a_rotation() -> None:
    ring = ring_at(T0, T0 + INTERVAL)
    first, second = ring.kids
    before = T0 + INTERVAL - HOUR
    assert ring.signer(before).kid == first
    assert [k.kid for k in ring.published(before)] == [first, second]  # next pre-published
    just_after = T0 + INTERVAL + dt.timedelta(minutes=5)
    assert ring.signer(just_after).kid == second
    assert [k.kid for k in ring.published(just_after)] == [second, first]  # old tokens live
    assert ring.expired(just_after) == []
    later = T0 + INTERVAL + TTL + keys_module.VERIFY_LEEWAY + dt.timedelta(seconds=1)
    assert [k.kid for k in ring.published(later)] == [second]
    assert ring.expired(later) == [first]


def test_an_empty_ring_is_refused() -> None:
    with pytest.raises(ValueError):
        KeyRing([], token_ttl=TTL)


def test_keys_round_trip_through_pem_with_and_without_encryption() -> None:
    key = SigningKey.generate(T0)
    for secret in (None, b"passphrase"):
        pem = key.private_pem(secret)
        loaded = SigningKey.from_pem(key.kid, pem, secret, key.created_at, key.activate_at)
        assert loaded.public_jwk() == key.public_jwk()
    encrypted = key.private_pem(b"passphrase")
    assert b"ENCRYPTED" in encrypted
    for wrong in (None, b"other"):
        with pytest.raises(ValueError):
            SigningKey.from_pem(key.kid, encrypted, wrong, T0, T0)
    assert "private_key" not in repr(key)


async def test_tokens_verify_with_only_the_published_jwks() -> None:
    import uuid

    ring = ring_at(T0)
    now = dt.datetime.now(dt.UTC)
    family = uuid.uuid4()
    issued = issue_access_token(ring.signer(T0), "user01", family, now, TTL)
    verifier = TokenVerifier(StaticJwksSource({"keys": ring.jwks(T0)}), internal_secret=None)
    principal = await verifier.verify(issued.token)
    assert principal.user_id == "user01" and principal.claims["sid"] == str(family)
    assert jwt.get_unverified_header(issued.token)["kid"] == ring.signer(T0).kid
    assert issued.expire_time == dt.datetime.fromtimestamp(principal.claims["exp"], dt.UTC)
    assert "token" not in repr(issued).replace("IssuedToken", "")


def test_refresh_tokens_are_random_and_hashed() -> None:
    token, stored = new_refresh_token()
    other, _ = new_refresh_token()
    assert token.startswith("rt_") and token != other
    assert stored == hash_refresh_token(token) and len(stored) == 32
