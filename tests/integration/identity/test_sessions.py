"""Log-in, access tokens, refresh-token rotation, reuse detection and log-out."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import grpc.aio
import jwt
import pytest
from spaces.identity.v1 import identity_service_pb2 as pb

from tests.helpers.tokens import SigningKey
from tests.integration.identity.harness import PASSWORD, Identity, bearer, reason


async def login(identity: Identity, handle: str, password: str = PASSWORD) -> pb.LoginResponse:
    response: pb.LoginResponse = await identity.stub.Login(
        pb.LoginRequest(handle=handle, password=password)
    )
    return response


async def refresh(identity: Identity, token: str) -> pb.RefreshTokenResponse:
    response: pb.RefreshTokenResponse = await identity.stub.RefreshToken(
        pb.RefreshTokenRequest(refresh_token=token)
    )
    return response


async def refresh_fails(identity: Identity, token: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refresh(identity, token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return reason(caught.value)


async def test_login_with_any_letter_case_starts_a_new_session(identity: Identity) -> None:
    user, signup_tokens = await identity.signup("Alice")
    response = await login(identity, "aLiCe")
    assert response.user.id == user.id
    tokens = response.tokens
    assert tokens.refresh_token != signup_tokens.refresh_token

    header = jwt.get_unverified_header(tokens.access_token)
    claims = jwt.decode(tokens.access_token, options={"verify_signature": False})
    assert header["alg"] == "EdDSA" and header["kid"] == identity.runtime.keys.signer().kid
    assert claims["sub"] == user.id and claims["iss"] == "spaces-identity"
    assert claims["aud"] == "spaces" and claims["jti"]
    assert claims["exp"] - claims["iat"] == 15 * 60
    assert tokens.access_token_expire_time.seconds == claims["exp"]
    signup_claims = jwt.decode(signup_tokens.access_token, options={"verify_signature": False})
    assert uuid.UUID(claims["sid"]) != uuid.UUID(signup_claims["sid"])  # one family per log-in
    expected_refresh_life = 30 * 24 * 3600
    assert tokens.refresh_token_expire_time.seconds - claims["iat"] in range(
        expected_refresh_life - 2, expected_refresh_life + 2
    )


async def test_wrong_password_and_unknown_handle_look_the_same(identity: Identity) -> None:
    await identity.signup("alice")
    failures = []
    for handle, password in (("alice", "wrong password"), ("nobody", PASSWORD)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await login(identity, handle, password)
        failures.append((caught.value.code(), caught.value.details(), reason(caught.value)))
    assert failures[0] == failures[1]
    assert failures[0][0] == grpc.StatusCode.UNAUTHENTICATED
    assert failures[0][2] == "INVALID_CREDENTIALS"


async def test_refresh_rotates_and_keeps_the_family_expiry(identity: Identity) -> None:
    user, first = await identity.signup("alice")
    second = (await refresh(identity, first.refresh_token)).tokens
    third = (await refresh(identity, second.refresh_token)).tokens
    assert len({first.refresh_token, second.refresh_token, third.refresh_token}) == 3
    # Rotation never extends the session.
    assert third.refresh_token_expire_time == first.refresh_token_expire_time
    claims = jwt.decode(third.access_token, options={"verify_signature": False})
    first_claims = jwt.decode(first.access_token, options={"verify_signature": False})
    assert claims["sub"] == user.id and claims["sid"] == first_claims["sid"]
    me = await identity.stub.GetUser(
        pb.GetUserRequest(name="users/me"), metadata=bearer(third.access_token)
    )
    assert me.user.id == user.id


async def test_reusing_a_spent_refresh_token_revokes_the_family(identity: Identity) -> None:
    _, first = await identity.signup("alice")
    other_session = (await login(identity, "alice")).tokens
    second = (await refresh(identity, first.refresh_token)).tokens

    assert await refresh_fails(identity, first.refresh_token) == "REFRESH_TOKEN_REUSED"
    # The thief's (or the victim's) newer token is dead too: the whole family is revoked.
    assert await refresh_fails(identity, second.refresh_token) == "REFRESH_TOKEN_INVALID"
    # Presenting the spent token again still says reused.
    assert await refresh_fails(identity, first.refresh_token) == "REFRESH_TOKEN_REUSED"
    # Another log-in (another family) is untouched.
    await refresh(identity, other_session.refresh_token)


async def test_racing_refreshes_with_one_token_let_one_through(identity: Identity) -> None:
    _, first = await identity.signup("alice")
    results = await asyncio.gather(
        *(refresh(identity, first.refresh_token) for _ in range(4)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, pb.RefreshTokenResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 3
    assert {reason(e) for e in losers} == {"REFRESH_TOKEN_REUSED"}
    # Reuse was detected, so even the winner's new token is revoked.
    assert await refresh_fails(identity, winners[0].tokens.refresh_token) == "REFRESH_TOKEN_INVALID"


async def test_unknown_and_expired_refresh_tokens_are_invalid(identity: Identity) -> None:
    _, tokens = await identity.signup("alice")
    assert await refresh_fails(identity, "rt_not-a-real-token") == "REFRESH_TOKEN_INVALID"
    await identity.sql("UPDATE refresh_tokens SET expire_time = now() - interval '1 second'")
    assert await refresh_fails(identity, tokens.refresh_token) == "REFRESH_TOKEN_INVALID"


async def test_logout_revokes_the_family_idempotently(identity: Identity) -> None:
    _, first = await identity.signup("alice")
    second = (await refresh(identity, first.refresh_token)).tokens
    auth = bearer(second.access_token)
    # Any token of the family ends the session, the spent one included.
    await identity.stub.Logout(pb.LogoutRequest(refresh_token=first.refresh_token), metadata=auth)
    assert await refresh_fails(identity, second.refresh_token) == "REFRESH_TOKEN_INVALID"
    await identity.stub.Logout(pb.LogoutRequest(refresh_token=second.refresh_token), metadata=auth)
    # The access token stays valid until it expires.
    await identity.stub.GetUser(pb.GetUserRequest(name="users/me"), metadata=auth)


async def test_logout_refuses_tokens_of_others(identity: Identity) -> None:
    _, alice = await identity.signup("alice")
    _, bob = await identity.signup("bob")
    for token in (bob.refresh_token, "rt_unknown"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.Logout(
                pb.LogoutRequest(refresh_token=token), metadata=bearer(alice.access_token)
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason(caught.value) == "REFRESH_TOKEN_NOT_OWNED"
    await refresh(identity, bob.refresh_token)  # untouched
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.Logout(pb.LogoutRequest(refresh_token=bob.refresh_token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_refresh_tokens_are_stored_hashed(identity: Identity) -> None:
    _, tokens = await identity.signup("alice")
    rows = await identity.sql("SELECT token_hash FROM refresh_tokens")
    assert len(rows) == 1
    stored = bytes(rows[0][0])
    assert tokens.refresh_token.encode() not in stored and len(stored) == 32


async def test_a_forged_or_foreign_token_is_refused(identity: Identity) -> None:
    user, _ = await identity.signup("alice")
    foreign = SigningKey.ed25519(kid=identity.runtime.keys.signer().kid).mint(user.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.GetUser(pb.GetUserRequest(name="users/me"), metadata=bearer(foreign))
    assert (caught.value.code(), reason(caught.value)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_TOKEN",
    )
