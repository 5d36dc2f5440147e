"""payments' outgoing calls against stand-in servers: identity's JWKS (the default token
keys of ``python -m services.payments.main``, through the shared client) and rooms'
GetParticipant (who may receive a tip)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from spaces.identity.v1 import identity_resources_pb2 as identity_res
from spaces.identity.v1 import identity_service_pb2 as identity_pb
from spaces.identity.v1 import identity_service_pb2_grpc as identity_grpc
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_res
from spaces.rooms.v1 import rooms_service_pb2 as rooms_pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as rooms_grpc

from services.common.auth import ServiceTokenIssuer, TokenVerifier
from services.common.jwks_client import IdentityJwksSource
from services.payments.stage import RoomsStageDirectory
from tests.helpers.tokens import TEST_INTERNAL_SECRET, SigningKey


class FakeIdentity(identity_grpc.IdentityServiceServicer):
    def __init__(self, key: SigningKey) -> None:
        self.key = key

    async def GetJwks(self, request: Any, context: Any) -> identity_pb.GetJwksResponse:
        jwk = self.key.public_jwk()
        return identity_pb.GetJwksResponse(
            keys=[
                identity_res.JsonWebKey(
                    **{k: jwk[k] for k in ("kty", "crv", "x", "kid", "alg", "use")}
                )
            ]
        )


class FakeRooms(rooms_grpc.RoomsServiceServicer):
    roles = {
        "speaker": rooms_res.PARTICIPANT_ROLE_SPEAKER,
        "fan": rooms_res.PARTICIPANT_ROLE_LISTENER,
    }

    def __init__(self) -> None:
        self.authorizations: list[str] = []

    async def GetParticipant(self, request: Any, context: Any) -> rooms_pb.GetParticipantResponse:
        metadata = dict(context.invocation_metadata())
        self.authorizations.append(metadata.get("authorization", ""))
        user = request.name.rsplit("/", 1)[1]
        if user not in self.roles:
            await context.abort(grpc.StatusCode.NOT_FOUND, "participant not found")
        return rooms_pb.GetParticipantResponse(
            participant=rooms_res.Participant(name=request.name, role=self.roles[user])
        )


@pytest.fixture
async def fakes(signing_key: SigningKey) -> AsyncIterator[tuple[int, FakeRooms]]:
    server = grpc.aio.server()
    # Stand-ins implement only the RPC payments calls.
    identity_grpc.add_IdentityServiceServicer_to_server(
        FakeIdentity(signing_key),  # type: ignore[abstract]
        server,
    )
    rooms = FakeRooms()  # type: ignore[abstract]
    rooms_grpc.add_RoomsServiceServicer_to_server(rooms, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, rooms
    finally:
        await server.stop(0)


async def test_tokens_verify_with_identitys_published_keys(
    fakes: tuple[int, FakeRooms], signing_key: SigningKey
) -> None:
    port, _ = fakes
    source = IdentityJwksSource.connect(f"127.0.0.1:{port}")
    try:
        keys = await source.get_keys()
        assert isinstance(keys[signing_key.kid], jwt.PyJWK)
        principal = await TokenVerifier(source, None).verify(signing_key.mint("bob"))
        assert principal.user_id == "bob"
    finally:
        await source.close()


async def test_stage_membership_comes_from_rooms(fakes: tuple[int, FakeRooms]) -> None:
    port, rooms = fakes
    stage = RoomsStageDirectory(
        f"127.0.0.1:{port}", ServiceTokenIssuer("payments", TEST_INTERNAL_SECRET)
    )
    try:
        assert await stage.is_on_stage("s1", "speaker") is True
        assert await stage.is_on_stage("s1", "fan") is False
        assert await stage.is_on_stage("s1", "stranger") is False
    finally:
        await stage.close()
    # Asked as the payments service, with its own token.
    assert all(value.startswith("Bearer ") for value in rooms.authorizations)
    claims = jwt.decode(
        rooms.authorizations[0].removeprefix("Bearer "),
        TEST_INTERNAL_SECRET,
        algorithms=["HS256"],
        audience="spaces-internal",
    )
    assert claims["sub"] == "service:payments"
