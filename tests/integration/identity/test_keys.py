"""Signing keys: the JWKS, rotation without logging anyone out, replicas agreeing, and
another service verifying identity's tokens with nothing but the GetJwks RPC."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import jwt
from pydantic import SecretStr
from spaces.identity.v1 import identity_service_pb2 as pb

from services.common.auth import TokenVerifier
from services.common.clients import create_channel
from services.common.jwks_client import GET_JWKS_METHOD, IdentityJwksSource
from tests.integration.identity.harness import Identity, bearer

StartIdentity = Callable[..., AbstractAsyncContextManager[Identity]]


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def jwks_kids(identity: Identity) -> list[str]:
    response = await identity.stub.GetJwks(pb.GetJwksRequest())
    return [key.kid for key in response.keys]


async def test_jwks_publishes_the_signing_key_as_an_okp_jwk(identity: Identity) -> None:
    response = await identity.stub.GetJwks(pb.GetJwksRequest())  # public: no token
    [key] = response.keys
    assert (key.kty, key.crv, key.alg, key.use) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert key.x and not key.y
    _, tokens = await identity.signup("alice")
    assert kid_of(tokens.access_token) == key.kid


async def test_rotation_keeps_old_tokens_valid(identity: Identity) -> None:
    user, old = await identity.signup("alice")
    old_kid = kid_of(old.access_token)

    new_key = await identity.runtime.keys.rotate_now()
    assert await jwks_kids(identity) == [new_key.kid, old_kid]  # signer first

    fresh = (
        await identity.stub.Login(pb.LoginRequest(handle="alice", password="correct horse battery"))
    ).tokens
    assert kid_of(fresh.access_token) == new_key.kid
    for token in (old.access_token, fresh.access_token):
        me = await identity.stub.GetUser(pb.GetUserRequest(name="users/me"), metadata=bearer(token))
        assert me.user.id == user.id
    # Refresh tokens do not depend on signing keys at all.
    rotated = await identity.stub.RefreshToken(
        pb.RefreshTokenRequest(refresh_token=old.refresh_token)
    )
    assert kid_of(rotated.tokens.access_token) == new_key.kid


async def test_a_scheduled_key_is_published_before_it_signs(identity: Identity) -> None:
    current = identity.runtime.keys.signer().kid
    upcoming = await identity.runtime.keys.rotate_now(activate_in=dt.timedelta(seconds=1))
    assert await jwks_kids(identity) == [current, upcoming.kid]
    _, before = await identity.signup("early")
    assert kid_of(before.access_token) == current
    await asyncio.sleep(1.1)
    _, after = await identity.signup("late")
    assert kid_of(after.access_token) == upcoming.kid
    assert await jwks_kids(identity) == [upcoming.kid, current]


async def test_expired_keys_leave_the_jwks_and_the_database(
    start_identity: StartIdentity,
) -> None:
    async with start_identity(access_token_ttl=dt.timedelta(seconds=1)) as identity:
        first = identity.runtime.keys.signer().kid
        second = await identity.runtime.keys.rotate_now()
        assert await jwks_kids(identity) == [second.kid, first]
        # first's last tokens expire 1 s after second took over, plus the verify leeway.
        await identity.sql(
            "UPDATE signing_keys SET activate_time = activate_time - interval '2 minutes'"
        )
        await identity.runtime.keys.check()
        assert await jwks_kids(identity) == [second.kid]
        assert await identity.sql("SELECT kid FROM signing_keys") == [(second.kid,)]


async def test_replicas_share_keys_and_agree_on_the_signer(start_identity: StartIdentity) -> None:
    async with start_identity() as one, start_identity() as two:
        assert await jwks_kids(one) == await jwks_kids(two)
        _, tokens = await one.signup("alice")
        me = await two.stub.GetUser(
            pb.GetUserRequest(name="users/me"), metadata=bearer(tokens.access_token)
        )
        assert me.user.handle == "alice"

        rotated = await one.runtime.keys.rotate_now()
        await two.runtime.keys.check()  # what its periodic reload does
        assert two.runtime.keys.signer().kid == rotated.kid
        assert await jwks_kids(two) == await jwks_kids(one)


async def test_replicas_starting_together_make_one_key(start_identity: StartIdentity) -> None:
    async with start_identity() as first:
        await first.sql("DELETE FROM signing_keys")
        await asyncio.gather(first.runtime.keys.check(), first.runtime.keys.check())
        assert len(await first.sql("SELECT kid FROM signing_keys")) == 1


async def test_private_keys_are_encrypted_at_rest_when_a_secret_is_set(
    start_identity: StartIdentity,
) -> None:
    secret = SecretStr("a long key encryption passphrase")
    async with start_identity(key_encryption_secret=secret) as identity:
        [(pem,)] = await identity.sql("SELECT private_pem FROM signing_keys")
        assert bytes(pem).startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        _, tokens = await identity.signup("alice")
        async with start_identity(key_encryption_secret=secret) as replica:
            await replica.stub.GetUser(
                pb.GetUserRequest(name="users/me"), metadata=bearer(tokens.access_token)
            )


async def test_another_service_verifies_tokens_with_only_the_jwks_rpc(
    identity: Identity,
) -> None:
    channel = create_channel(
        f"127.0.0.1:{identity.service.port}", idempotent_methods=[GET_JWKS_METHOD]
    )
    try:
        # No internal secret, no private key: only what GetJwks publishes.
        verifier = TokenVerifier(IdentityJwksSource(channel), internal_secret=None)
        user, old = await identity.signup("alice")
        principal = await verifier.verify(old.access_token)
        assert principal.is_user and principal.user_id == user.id

        # Rotation at once: the verifier meets an unknown kid and refetches.
        await identity.runtime.keys.rotate_now()
        fresh = await identity.stub.Login(
            pb.LoginRequest(handle="alice", password="correct horse battery")
        )
        assert kid_of(fresh.tokens.access_token) != kid_of(old.access_token)
        eager = TokenVerifier(
            IdentityJwksSource(channel), internal_secret=None, min_refresh_interval_s=0
        )
        assert (await eager.verify(old.access_token)).user_id == user.id
        assert (await eager.verify(fresh.tokens.access_token)).user_id == user.id
    finally:
        await channel.close(None)


async def test_a_prepublished_key_verifies_from_the_cache_without_a_refetch(
    identity: Identity,
) -> None:
    fetches = 0

    class CountingSource(IdentityJwksSource):
        async def get_keys(self) -> dict[str, jwt.PyJWK]:
            nonlocal fetches
            fetches += 1
            return await super().get_keys()

    source = CountingSource.connect(f"127.0.0.1:{identity.service.port}")
    try:
        # Default caching (5 minutes, at most one refetch per 30 s), like every service.
        verifier = TokenVerifier(source, internal_secret=None)
        _, old = await identity.signup("alice")
        upcoming = await identity.runtime.keys.rotate_now(activate_in=dt.timedelta(seconds=1))
        await verifier.verify(old.access_token)  # first fetch: already holds the next key
        await asyncio.sleep(1.1)
        _, fresh = await identity.signup("bob")
        assert kid_of(fresh.access_token) == upcoming.kid
        assert (await verifier.verify(fresh.access_token)).is_user
        assert (await verifier.verify(old.access_token)).is_user
        assert fetches == 1
    finally:
        await source.close()
