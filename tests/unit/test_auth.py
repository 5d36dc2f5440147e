"""Token verification and service tokens, without a server."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from services.common.auth import (
    Principal,
    PrincipalKind,
    ServiceTokenIssuer,
    StaticJwksSource,
    TokenVerifier,
)
from services.common.errors import Unauthenticated, Unavailable
from tests.helpers.tokens import TEST_INTERNAL_SECRET, SigningKey, jwks, unsigned_token


class FakeClock:
    """Stands in for the ``time`` module inside services.common.auth only."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


class CountingSource:
    """A JWKS source whose keys can change, counting fetches."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.fetches = 0

    async def get_keys(self) -> dict[str, jwt.PyJWK]:
        self.fetches += 1
        return {k.kid: jwt.PyJWK.from_dict(k.public_jwk()) for k in self.keys}


async def test_user_token_gives_a_user_principal() -> None:
    key = SigningKey.ed25519()
    verifier = TokenVerifier(StaticJwksSource(jwks(key)), TEST_INTERNAL_SECRET)
    principal = await verifier.verify(key.mint("alice", role="x"))
    assert principal.kind is PrincipalKind.USER
    assert principal.user_id == "alice" and principal.service_name is None
    assert principal.claims["role"] == "x"
    assert principal == Principal.user("alice")


async def test_service_token_gives_a_service_principal() -> None:
    verifier = TokenVerifier(StaticJwksSource({"keys": []}), TEST_INTERNAL_SECRET)
    principal = await verifier.verify(ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET).token())
    assert principal.is_service and principal.service_name == "rooms"


async def test_service_tokens_refused_without_a_secret() -> None:
    verifier = TokenVerifier(StaticJwksSource({"keys": []}), None)
    with pytest.raises(Unauthenticated):
        await verifier.verify(ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET).token())


async def test_a_user_token_cannot_claim_to_be_a_service() -> None:
    key = SigningKey.ed25519()
    verifier = TokenVerifier(StaticJwksSource(jwks(key)), TEST_INTERNAL_SECRET)
    with pytest.raises(Unauthenticated):
        await verifier.verify(key.mint("service:rooms"))


async def test_none_and_foreign_algorithms_are_refused() -> None:
    key = SigningKey.ed25519()
    verifier = TokenVerifier(StaticJwksSource(jwks(key)), TEST_INTERNAL_SECRET)
    with pytest.raises(Unauthenticated):
        await verifier.verify(unsigned_token(kid=key.kid))
    hs512 = jwt.encode({"sub": "service:x"}, TEST_INTERNAL_SECRET * 2, algorithm="HS512")
    with pytest.raises(Unauthenticated):
        await verifier.verify(hs512)


async def test_key_algorithm_must_match_header() -> None:
    ed = SigningKey.ed25519(kid="k1")
    es = SigningKey.es256(kid="k1")  # publishes k1 as an EC key
    verifier = TokenVerifier(StaticJwksSource(jwks(es)), None)
    with pytest.raises(Unauthenticated):
        await verifier.verify(ed.mint())


async def test_expired_within_leeway_is_accepted() -> None:
    key = SigningKey.ed25519()
    verifier = TokenVerifier(StaticJwksSource(jwks(key)), None, leeway_s=30)
    assert (await verifier.verify(key.mint(ttl_s=-10))).user_id == "alice"
    with pytest.raises(Unauthenticated) as failure:
        await verifier.verify(key.mint(ttl_s=-60))
    assert failure.value.reason == "TOKEN_EXPIRED"


async def test_missing_claims_are_refused() -> None:
    key = SigningKey.ed25519()
    verifier = TokenVerifier(StaticJwksSource(jwks(key)), None)
    token = jwt.encode(
        {"sub": "alice", "aud": "spaces", "iss": "spaces-identity", "exp": time.time() + 60},
        key.private_key,
        algorithm="EdDSA",
        headers={"kid": key.kid},
    )
    with pytest.raises(Unauthenticated):
        await verifier.verify(token)  # no iat, no jti


async def test_rotation_refetches_keys_but_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = SigningKey.ed25519(kid="old"), SigningKey.ed25519(kid="new")
    source = CountingSource(old)
    verifier = TokenVerifier(source, None, min_refresh_interval_s=30)
    clock = FakeClock(1000.0)
    monkeypatch.setattr("services.common.auth.time", clock)

    await verifier.verify(old.mint())
    assert source.fetches == 1
    source.keys.append(new)  # identity rotates
    clock.now += 31
    assert (await verifier.verify(new.mint())).user_id == "alice"
    assert source.fetches == 2

    # Forged kids do not make us hammer identity.
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            await verifier.verify(old.mint(kid="forged"))
    assert source.fetches == 2
    clock.now += 31
    with pytest.raises(Unauthenticated):
        await verifier.verify(old.mint(kid="forged"))
    assert source.fetches == 3


async def test_keys_are_refetched_after_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    key = SigningKey.ed25519()
    source = CountingSource(key)
    verifier = TokenVerifier(source, None, cache_ttl_s=300)
    clock = FakeClock(0.0)
    monkeypatch.setattr("services.common.auth.time", clock)
    await verifier.verify(key.mint())
    await verifier.verify(key.mint())
    assert source.fetches == 1
    clock.now += 301
    await verifier.verify(key.mint())
    assert source.fetches == 2


def test_service_token_is_reused_then_renewed(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(time.time())
    monkeypatch.setattr("services.common.auth.time", clock)
    issuer = ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET, ttl_s=300, renew_before_s=60)
    first = issuer.token()
    clock.now += 200
    assert issuer.token() == first
    clock.now += 50  # 50 s left: renew
    second = issuer.token()
    assert second != first
    claims: dict[str, Any] = jwt.decode(
        second,
        TEST_INTERNAL_SECRET,
        algorithms=["HS256"],
        audience="spaces-internal",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["sub"] == "service:rooms"
    assert claims["exp"] - claims["iat"] == 300


def test_issuer_needs_a_secret() -> None:
    with pytest.raises(ValueError):
        ServiceTokenIssuer("rooms", "")


class BrokenSource:
    async def get_keys(self) -> dict[str, jwt.PyJWK]:
        raise ConnectionError("identity is down")


async def test_unreachable_key_source_is_unavailable_not_unauthenticated() -> None:
    key = SigningKey.ed25519()
    verifier = TokenVerifier(BrokenSource(), None)
    with pytest.raises(Unavailable) as failure:
        await verifier.verify(key.mint())
    assert failure.value.reason == "JWKS_UNAVAILABLE"
