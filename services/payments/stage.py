"""Who is on a Space's stage, asked of rooms (payments keeps no participant state).

Only tips need it: a tip goes to the host, a co-host or a speaker. The host is known
from the Space projection; anyone else is checked with rooms' GetParticipant.
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc
import grpc.aio
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_pb
from spaces.rooms.v1 import rooms_service_pb2 as rooms_service_pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as rooms_grpc

from services.common.auth import ServiceTokenIssuer
from services.common.clients import CallIdentity, create_channel
from services.common.errors import Unavailable

logger = logging.getLogger(__name__)

__all__ = ["RoomsStageDirectory", "StageDirectory", "StaticStageDirectory"]

_ON_STAGE = frozenset(
    {
        rooms_pb.PARTICIPANT_ROLE_HOST,
        rooms_pb.PARTICIPANT_ROLE_CO_HOST,
        rooms_pb.PARTICIPANT_ROLE_SPEAKER,
    }
)
ROOMS_IDEMPOTENT = ["spaces.rooms.v1.RoomsService/GetParticipant"]


class StageDirectory(Protocol):
    """Answers whether a user is on a Space's stage right now."""

    async def is_on_stage(self, space_id: str, user_id: str) -> bool: ...


class RoomsStageDirectory:
    """:class:`StageDirectory` over rooms' gRPC API, called as the payments service.

    :param target: rooms' address.
    :param issuer: mints payments' service tokens.
    """

    def __init__(self, target: str, issuer: ServiceTokenIssuer) -> None:
        self._channel = create_channel(
            target,
            idempotent_methods=ROOMS_IDEMPOTENT,
            token_issuer=issuer,
            identity=CallIdentity.SERVICE,
            default_timeout_s=2.0,
        )
        self._stub = rooms_grpc.RoomsServiceStub(self._channel)

    async def is_on_stage(self, space_id: str, user_id: str) -> bool:
        """Whether rooms says the user is the host, a co-host or a speaker."""
        try:
            response = await self._stub.GetParticipant(
                rooms_service_pb.GetParticipantRequest(
                    name=f"spaces/{space_id}/participants/{user_id}"
                )
            )
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                return False
            logger.warning("rooms GetParticipant failed: %s", error.code().name)
            raise Unavailable("rooms is unavailable", reason="DEPENDENCY_UNAVAILABLE") from None
        return response.participant.role in _ON_STAGE

    async def close(self) -> None:
        await self._channel.close(None)


class StaticStageDirectory:
    """A :class:`StageDirectory` from a fixed map (tests, and rooms-less local runs)."""

    def __init__(self, stage: dict[str, set[str]] | None = None) -> None:
        self.stage: dict[str, set[str]] = stage if stage is not None else {}

    async def is_on_stage(self, space_id: str, user_id: str) -> bool:
        return user_id in self.stage.get(space_id, set())
