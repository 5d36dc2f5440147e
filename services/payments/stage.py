"""Who is on a Space's stage and who may see it, asked of rooms (payments keeps no
participant or visibility state).

Tips need the stage: a tip goes to the host, a co-host or a speaker. The host is known
from the Space projection; anyone else is checked with rooms' GetParticipant.

Every user-facing call on a Space needs its visibility: a Space the caller may not see
(invited-only, followers-only, a block between them and the host) is answered NOT_FOUND, as
rooms does, so payments neither leaks that it exists nor takes money for it. Only rooms
knows (invitations, follows, blocks, join links), so it is asked with the caller's own
token: its GetSpace applies exactly its own rules.
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
from services.common.clients import CallIdentity, call_as, create_channel
from services.common.context import time_left_for_wait
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
ROOMS_IDEMPOTENT = [
    "spaces.rooms.v1.RoomsService/GetParticipant",
    "spaces.rooms.v1.RoomsService/GetSpace",
]


class StageDirectory(Protocol):
    """Answers whether a user is on a Space's stage right now, and whether they may see it."""

    async def is_on_stage(self, space_id: str, user_id: str) -> bool: ...

    async def may_see(self, space_id: str, user_id: str) -> bool:
        """Whether ``user_id``, the user of the call being served, may see the Space."""
        ...


class RoomsStageDirectory:
    """:class:`StageDirectory` over rooms' gRPC API: the stage asked as the payments service,
    visibility with the caller's own token.

    :param target: rooms' address.
    :param issuer: mints payments' service tokens.
    :param check_visibility: ask rooms in :meth:`may_see`; off (every Space visible) only
        where no rooms runs (``PAYMENTS_VISIBILITY_CHECK``).
    """

    def __init__(
        self, target: str, issuer: ServiceTokenIssuer, *, check_visibility: bool = True
    ) -> None:
        self._check_visibility = check_visibility
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
                ),
                # Leave time to answer UNAVAILABLE ourselves if rooms cannot answer.
                timeout=time_left_for_wait(),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                return False
            logger.warning("rooms GetParticipant failed: %s", error.code().name)
            raise Unavailable("rooms is unavailable", reason="DEPENDENCY_UNAVAILABLE") from None
        return response.participant.role in _ON_STAGE

    async def may_see(self, space_id: str, user_id: str) -> bool:
        """Whether rooms shows the Space to the caller (``user_id``): rooms' GetSpace with
        the caller's own token, so every rule of rooms applies. A join link is not asked
        for: paying for a Space is for those who may see it without one."""
        if not self._check_visibility:
            return True
        try:
            with call_as(CallIdentity.FORWARD_USER):
                await self._stub.GetSpace(
                    rooms_service_pb.GetSpaceRequest(name=f"spaces/{space_id}"),
                    timeout=time_left_for_wait(),
                )
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                return False
            logger.warning("rooms GetSpace failed: %s", error.code().name)
            raise Unavailable("rooms is unavailable", reason="DEPENDENCY_UNAVAILABLE") from None
        return True

    async def close(self) -> None:
        await self._channel.close(None)


class StaticStageDirectory:
    """A :class:`StageDirectory` from fixed maps (tests, and rooms-less local runs).

    :param stage: who is on each Space's stage.
    :param hidden: whom each Space is hidden from; every other Space is visible to all.
    """

    def __init__(
        self, stage: dict[str, set[str]] | None = None, hidden: dict[str, set[str]] | None = None
    ) -> None:
        self.stage: dict[str, set[str]] = stage if stage is not None else {}
        self.hidden: dict[str, set[str]] = hidden if hidden is not None else {}

    async def is_on_stage(self, space_id: str, user_id: str) -> bool:
        return user_id in self.stage.get(space_id, set())

    async def may_see(self, space_id: str, user_id: str) -> bool:
        return user_id not in self.hidden.get(space_id, set())
