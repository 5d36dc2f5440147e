"""gRPC test doubles of the services rooms calls that do not exist yet (media, payments).

They run as real gRPC servers on the shared runtime (port 0, service-token auth), so
rooms talks to them exactly as it will to the real services.

* :class:`RecordingMediaControl`: MediaService's internal RPCs (OpenSpace,
  PlaceParticipant, UpdatePermissions, CloseSpace), recording every call with the time it
  arrived, and keeping the latest permissions per participant (older revisions ignored,
  as media promises).
* :class:`TicketBook`: PaymentsService.CheckTicket from a set of (space id, user id).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr
from spaces.media.v1 import media_resources_pb2 as media_res
from spaces.media.v1 import media_service_pb2 as media_pb
from spaces.media.v1 import media_service_pb2_grpc as media_grpc
from spaces.payments.v1 import payments_service_pb2 as pay_pb
from spaces.payments.v1 import payments_service_pb2_grpc as pay_grpc

from services.common import errors
from services.common.auth import StaticJwksSource
from services.common.server import Service
from services.common.settings import CommonSettings
from tests.helpers.servers import testing_settings
from tests.helpers.tokens import TEST_INTERNAL_SECRET


@dataclass(frozen=True)
class MediaCall:
    """One call media received: the RPC, the request and when (time.monotonic())."""

    method: str
    request: Any
    at: float


@dataclass
class Permissions:
    """The latest permissions media applied for a participant."""

    may_publish: bool
    muted: bool
    removed: bool
    revision: int


@dataclass
class RecordingMediaControl(media_grpc.MediaServiceServicer):
    """MediaService's internal control plane, recording calls."""

    origin: str = "media-1"
    edge: str = "media-2"
    full: bool = False
    listeners_on_origin: int = 1000
    calls: list[MediaCall] = field(default_factory=list)
    permissions: dict[str, Permissions] = field(default_factory=dict)
    open_spaces: set[str] = field(default_factory=set)
    closed_spaces: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _record(self, method: str, request: Any) -> None:
        self.calls.append(MediaCall(method, request, time.monotonic()))
        self.changed.set()

    def of(self, method: str) -> list[Any]:
        """Requests of ``method``, in arrival order."""
        return [c.request for c in self.calls if c.method == method]

    async def wait_for(self, predicate: Any, timeout: float = 2.0) -> float:
        """Wait until ``predicate()`` holds; return time.monotonic() when it first did."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("media never saw the expected call")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 0.05)
            except TimeoutError:
                pass
        return time.monotonic()

    async def OpenSpace(
        self, request: media_pb.OpenSpaceRequest, context: Any
    ) -> media_pb.OpenSpaceResponse:
        self._record("OpenSpace", request)
        if self.full:
            raise errors.Unavailable("no node has room", reason="NO_MEDIA_CAPACITY")
        if request.space in self.closed_spaces:
            raise errors.FailedPrecondition("closed", reason="SPACE_CLOSED")
        self.open_spaces.add(request.space)
        return media_pb.OpenSpaceResponse(
            origin_node=f"mediaNodes/{self.origin}",
            recording=f"{request.space}/recordings/r1" if request.record else "",
        )

    async def PlaceParticipant(
        self, request: media_pb.PlaceParticipantRequest, context: Any
    ) -> media_pb.PlaceParticipantResponse:
        self._record("PlaceParticipant", request)
        space = "/".join(request.participant.split("/")[:2])
        if space not in self.open_spaces:
            raise errors.FailedPrecondition("not open", reason="SPACE_NOT_OPEN")
        if self.full:
            raise errors.Unavailable("no node has room", reason="NO_MEDIA_CAPACITY")
        node = self.origin if request.may_publish else self.origin
        if request.avoid_node == f"mediaNodes/{node}":
            node = self.edge
        return media_pb.PlaceParticipantResponse(
            node=f"mediaNodes/{node}",
            endpoint=f"127.0.0.1:{5000 if node == self.origin else 5001}",
            node_role=media_res.NODE_ROLE_ORIGIN
            if node == self.origin
            else media_res.NODE_ROLE_EDGE,
        )

    async def UpdatePermissions(
        self, request: media_pb.UpdatePermissionsRequest, context: Any
    ) -> media_pb.UpdatePermissionsResponse:
        self._record("UpdatePermissions", request)
        current = self.permissions.get(request.participant)
        if current is not None and current.revision >= request.revision:
            return media_pb.UpdatePermissionsResponse(applied=False)
        self.permissions[request.participant] = Permissions(
            request.may_publish, request.muted, request.removed, request.revision
        )
        return media_pb.UpdatePermissionsResponse(applied=True, session_count=1)

    async def CloseSpace(
        self, request: media_pb.CloseSpaceRequest, context: Any
    ) -> media_pb.CloseSpaceResponse:
        self._record("CloseSpace", request)
        self.open_spaces.discard(request.space)
        self.closed_spaces.add(request.space)
        return media_pb.CloseSpaceResponse()


@dataclass
class TicketBook(pay_grpc.PaymentsServiceServicer):
    """PaymentsService.CheckTicket over a set of tickets.

    :ivar offerings: Space ids that sell tickets.
    :ivar tickets: (Space id, user id) pairs holding a paid ticket.
    """

    offerings: set[str] = field(default_factory=set)
    tickets: set[tuple[str, str]] = field(default_factory=set)
    checks: list[tuple[str, str]] = field(default_factory=list)

    def sell(self, space_id: str, user_id: str) -> None:
        """Give ``user_id`` a paid ticket for ``space_id``."""
        self.offerings.add(space_id)
        self.tickets.add((space_id, user_id))

    async def CheckTicket(
        self, request: pay_pb.CheckTicketRequest, context: Any
    ) -> pay_pb.CheckTicketResponse:
        space_id = request.space.split("/")[1]
        user_id = request.user.split("/")[1]
        self.checks.append((space_id, user_id))
        has = (space_id, user_id) in self.tickets
        return pay_pb.CheckTicketResponse(
            ticket_required=space_id in self.offerings,
            has_ticket=has,
            ticket=f"spaces/{space_id}/tickets/t-{user_id}" if has else "",
        )


def _double_service(name: str) -> Service:
    return Service(
        name,
        testing_settings(),
        CommonSettings(internal_secret=SecretStr(TEST_INTERNAL_SECRET)),
        jwks=StaticJwksSource({"keys": []}),
    )


@asynccontextmanager
async def running_media(media: RecordingMediaControl) -> AsyncIterator[Service]:
    """Serve ``media`` on a free port."""
    service = _double_service("media")
    service.add_servicer(
        media_pb.DESCRIPTOR.services_by_name["MediaService"],
        media,
        media_grpc.add_MediaServiceServicer_to_server,
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace=0)


@asynccontextmanager
async def running_payments(book: TicketBook) -> AsyncIterator[Service]:
    """Serve ``book`` on a free port."""
    service = _double_service("payments")
    service.add_servicer(
        pay_pb.DESCRIPTOR.services_by_name["PaymentsService"],
        book,
        pay_grpc.add_PaymentsServiceServicer_to_server,
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace=0)
