"""What rooms asks of other services, each behind a small Protocol with its gRPC client.

* identity: who may host, blocks, follows, whether users exist;
* payments: whether a user holds a ticket;
* media: opening and closing a Space's media, placing participants, pushing permissions.

Calls carry rooms' service token and a deadline (the channel's default, cut to what is
left of the RPC being served). Only reads and calls media treats as idempotent are retried
on UNAVAILABLE (by the channel's service config).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio
from spaces.identity.v1 import identity_service_pb2 as identity_pb
from spaces.identity.v1 import identity_service_pb2_grpc as identity_grpc
from spaces.media.v1 import media_resources_pb2 as media_resources
from spaces.media.v1 import media_service_pb2 as media_pb
from spaces.media.v1 import media_service_pb2_grpc as media_grpc
from spaces.payments.v1 import payments_service_pb2 as payments_pb
from spaces.payments.v1 import payments_service_pb2_grpc as payments_grpc

from services.common.auth import ServiceTokenIssuer
from services.common.clients import CallIdentity, call_as
from services.common.errors import Unavailable, error_info

logger = logging.getLogger(__name__)

__all__ = [
    "IDENTITY_IDEMPOTENT",
    "MEDIA_IDEMPOTENT",
    "PAYMENTS_IDEMPOTENT",
    "GrpcIdentity",
    "GrpcMedia",
    "GrpcPayments",
    "HostEligibility",
    "MediaSpaceNotOpen",
    "OpenedSpace",
    "Identity",
    "Media",
    "Payments",
    "Placement",
]

IDENTITY_IDEMPOTENT = ["spaces.identity.v1.IdentityService"]
PAYMENTS_IDEMPOTENT = ["spaces.payments.v1.PaymentsService/CheckTicket"]
# Every internal media RPC rooms uses is safe to repeat: OpenSpace returns the same origin,
# UpdatePermissions carries a revision, CloseSpace is idempotent, placement is a read.
MEDIA_IDEMPOTENT = [
    "spaces.media.v1.MediaService/OpenSpace",
    "spaces.media.v1.MediaService/PlaceParticipant",
    "spaces.media.v1.MediaService/UpdatePermissions",
    "spaces.media.v1.MediaService/CloseSpace",
]


@dataclass(frozen=True)
class HostEligibility:
    """Identity's answer on hosting."""

    eligible: bool
    min_followers: int
    follower_count: int


@dataclass(frozen=True)
class Placement:
    """Where media put a participant."""

    node: str
    endpoint: str
    origin: bool


@dataclass(frozen=True)
class OpenedSpace:
    """What media answered to OpenSpace.

    :ivar origin: the Space's origin node id.
    :ivar recording: the recording started, ``spaces/{space}/recordings/{recording}``; empty
        when the Space is not recorded.
    """

    origin: str
    recording: str = ""


class Identity(Protocol):
    """What rooms needs from identity."""

    async def host_eligibility(self, user_id: str) -> HostEligibility: ...

    async def blocked_between(self, user_id: str, others: Sequence[str]) -> set[str]:
        """The ``others`` with a block between them and ``user_id``, either way."""
        ...

    async def follows(self, subject_id: str, other_id: str) -> bool:
        """Whether ``subject_id`` follows ``other_id``."""
        ...

    async def following_ids(self, user_id: str, limit: int) -> list[str]:
        """Users ``user_id`` follows (at most ``limit``)."""
        ...

    async def missing_users(self, user_ids: Sequence[str]) -> str | None:
        """The first of ``user_ids`` that does not exist, or None."""
        ...


class Payments(Protocol):
    """What rooms needs from payments."""

    async def has_ticket(self, space_id: str, user_id: str) -> bool:
        """Whether the user may enter a ticketed Space (no offering counts as yes)."""
        ...


class Media(Protocol):
    """What rooms needs from media's internal API."""

    async def open_space(self, space_id: str, record: bool) -> OpenedSpace:
        """Prepare media for a Space; return its origin node and recording."""
        ...

    async def place(self, space_id: str, user_id: str, may_publish: bool, avoid: str) -> Placement:
        """Pick the node a participant connects to."""
        ...

    async def update_permissions(
        self,
        space_id: str,
        user_id: str,
        *,
        may_publish: bool,
        muted: bool,
        removed: bool,
        revision: int,
    ) -> None:
        """Apply a participant's current permissions."""
        ...

    async def close_space(self, space_id: str) -> None:
        """End a Space's media."""
        ...


class MediaSpaceNotOpen(Exception):
    """Media does not serve the Space (lost it or never opened it): open it again."""


def _unavailable(what: str, error: grpc.aio.AioRpcError) -> Unavailable:
    return Unavailable(
        f"{what} is unavailable: {error.code().name}", reason="DEPENDENCY_UNAVAILABLE"
    )


class GrpcIdentity:
    """:class:`Identity` over identity's gRPC API.

    :param channel: a channel from :func:`services.common.clients.create_channel`.
    :param token_issuer: rooms' service token issuer, for server-streaming calls.
    """

    def __init__(
        self, channel: grpc.aio.Channel, token_issuer: ServiceTokenIssuer | None = None
    ) -> None:
        self._stub = identity_grpc.IdentityServiceStub(channel)
        self._issuer = token_issuer

    def _stream_metadata(self) -> tuple[tuple[str, str], ...] | None:
        # The shared outgoing interceptor's token does not reach server-streaming calls
        # (grpc.aio drops the metadata a unary-stream interceptor adds), so streams carry
        # the service token themselves.
        if self._issuer is None:
            return None
        return (("authorization", f"Bearer {self._issuer.token()}"),)

    async def host_eligibility(self, user_id: str) -> HostEligibility:
        """Ask CheckHostEligibility."""
        try:
            with call_as(CallIdentity.SERVICE):
                response = await self._stub.CheckHostEligibility(
                    identity_pb.CheckHostEligibilityRequest(user=f"users/{user_id}")
                )
        except grpc.aio.AioRpcError as error:
            raise _unavailable("identity", error) from error
        return HostEligibility(response.eligible, response.min_followers, response.follower_count)

    async def blocked_between(self, user_id: str, others: Sequence[str]) -> set[str]:
        """Ask BatchCheckBlocks, 1000 at a time."""
        unique = sorted({o for o in others if o != user_id})
        blocked: set[str] = set()
        for start in range(0, len(unique), 1000):
            chunk = unique[start : start + 1000]
            try:
                with call_as(CallIdentity.SERVICE):
                    response = await self._stub.BatchCheckBlocks(
                        identity_pb.BatchCheckBlocksRequest(user_id=user_id, other_user_ids=chunk)
                    )
            except grpc.aio.AioRpcError as error:
                raise _unavailable("identity", error) from error
            blocked.update(c.other_user_id for c in response.checks if c.blocking or c.blocked_by)
        return blocked

    async def follows(self, subject_id: str, other_id: str) -> bool:
        """Ask GetRelationship from the subject's side."""
        if subject_id == other_id:
            return False
        try:
            with call_as(CallIdentity.SERVICE):
                response = await self._stub.GetRelationship(
                    identity_pb.GetRelationshipRequest(
                        name=f"users/{subject_id}/relationships/{other_id}"
                    )
                )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise _unavailable("identity", error) from error
        return response.relationship.following

    async def following_ids(self, user_id: str, limit: int) -> list[str]:
        """Read StreamFollowingIds to the end (or ``limit``)."""
        ids: list[str] = []
        try:
            with call_as(CallIdentity.SERVICE):
                call = self._stub.StreamFollowingIds(
                    identity_pb.StreamFollowingIdsRequest(
                        parent=f"users/{user_id}", batch_size=min(limit, 10000)
                    ),
                    metadata=self._stream_metadata(),
                    timeout=10.0,
                )
                async for batch in call:
                    ids.extend(batch.following_ids)
                    if len(ids) >= limit:
                        call.cancel()
                        break
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return []
            if error.code() != grpc.StatusCode.CANCELLED:
                raise _unavailable("identity", error) from error
        return ids[:limit]

    async def missing_users(self, user_ids: Sequence[str]) -> str | None:
        """Ask BatchGetUsers (all or nothing), 100 at a time."""
        for start in range(0, len(user_ids), 100):
            chunk = user_ids[start : start + 100]
            try:
                with call_as(CallIdentity.SERVICE):
                    await self._stub.BatchGetUsers(
                        identity_pb.BatchGetUsersRequest(names=[f"users/{u}" for u in chunk])
                    )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    info = error_info(error)
                    name = info.metadata.get("name", "") if info is not None else ""
                    return name.removeprefix("users/") or chunk[0]
                raise _unavailable("identity", error) from error
        return None


class GrpcPayments:
    """:class:`Payments` over payments' gRPC API."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = payments_grpc.PaymentsServiceStub(channel)

    async def has_ticket(self, space_id: str, user_id: str) -> bool:
        """Ask CheckTicket."""
        try:
            with call_as(CallIdentity.SERVICE):
                response = await self._stub.CheckTicket(
                    payments_pb.CheckTicketRequest(
                        space=f"spaces/{space_id}", user=f"users/{user_id}"
                    )
                )
        except grpc.aio.AioRpcError as error:
            raise _unavailable("payments", error) from error
        return not response.ticket_required or response.has_ticket


def _no_capacity(error: grpc.aio.AioRpcError) -> Unavailable:
    return Unavailable(
        "no media node has room; retry later", reason="NO_MEDIA_CAPACITY", retry_after=5.0
    )


class GrpcMedia:
    """:class:`Media` over media's internal gRPC API."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = media_grpc.MediaServiceStub(channel)

    async def open_space(self, space_id: str, record: bool) -> OpenedSpace:
        """Call OpenSpace."""
        try:
            with call_as(CallIdentity.SERVICE):
                response = await self._stub.OpenSpace(
                    media_pb.OpenSpaceRequest(space=f"spaces/{space_id}", record=record)
                )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise _no_capacity(error) from error
            raise _unavailable("media", error) from error
        return OpenedSpace(response.origin_node.removeprefix("mediaNodes/"), response.recording)

    async def place(self, space_id: str, user_id: str, may_publish: bool, avoid: str) -> Placement:
        """Call PlaceParticipant."""
        try:
            with call_as(CallIdentity.SERVICE):
                response = await self._stub.PlaceParticipant(
                    media_pb.PlaceParticipantRequest(
                        participant=f"spaces/{space_id}/participants/{user_id}",
                        may_publish=may_publish,
                        avoid_node=f"mediaNodes/{avoid}" if avoid else "",
                    )
                )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise _no_capacity(error) from error
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # The Space is not open on media (media lost it, or rooms never opened it).
                raise MediaSpaceNotOpen(space_id) from error
            raise _unavailable("media", error) from error
        return Placement(
            node=response.node.removeprefix("mediaNodes/"),
            endpoint=response.endpoint,
            origin=response.node_role == media_resources.NODE_ROLE_ORIGIN,
        )

    async def update_permissions(
        self,
        space_id: str,
        user_id: str,
        *,
        may_publish: bool,
        muted: bool,
        removed: bool,
        revision: int,
    ) -> None:
        """Call UpdatePermissions."""
        with call_as(CallIdentity.SERVICE):
            await self._stub.UpdatePermissions(
                media_pb.UpdatePermissionsRequest(
                    participant=f"spaces/{space_id}/participants/{user_id}",
                    may_publish=may_publish,
                    muted=muted,
                    removed=removed,
                    revision=revision,
                ),
                timeout=1.0,
            )

    async def close_space(self, space_id: str) -> None:
        """Call CloseSpace."""
        with call_as(CallIdentity.SERVICE):
            await self._stub.CloseSpace(media_pb.CloseSpaceRequest(space=f"spaces/{space_id}"))
