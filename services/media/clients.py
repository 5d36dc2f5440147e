"""Media's calls to other services: reports to rooms, and the access checks of recordings.

* :class:`GrpcRooms` is the :class:`~services.media.node.RoomsLink` over rooms' internal
  RPCs (``ReportPeerStates``, ``ReportSpeakingLevels``, ``RequestMediaReconnect``), with
  media's service token.
* :class:`GrpcSpaceAccess` decides whether the calling user may see a Space's recordings:
  rooms' ``GetSpace`` with the user's own token (so visibility rules stay in rooms), then,
  for a ticketed Space not hosted by the caller, payments' ``CheckTicket``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2
from spaces.media.v1 import media_service_pb2 as media_pb
from spaces.media.v1 import media_service_pb2_grpc as media_grpc
from spaces.payments.v1 import payments_service_pb2 as payments_pb
from spaces.payments.v1 import payments_service_pb2_grpc as payments_grpc
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_res
from spaces.rooms.v1 import rooms_service_pb2 as rooms_pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as rooms_grpc

from services.common.auth import ServiceTokenIssuer
from services.common.clients import CallIdentity, call_as, create_channel
from services.common.errors import NotFound, PermissionDenied, Unavailable
from services.media.captions import CaptionSegmentData
from services.media.levels import SpeakerLevel
from services.media.node import PeerChange

logger = logging.getLogger(__name__)

__all__ = [
    "MEDIA_IDEMPOTENT",
    "PAYMENTS_IDEMPOTENT",
    "ROOMS_IDEMPOTENT",
    "GrpcNodeLink",
    "GrpcRooms",
    "GrpcSpaceAccess",
]

ROOMS_IDEMPOTENT = [
    "spaces.rooms.v1.RoomsService/GetSpace",
    "spaces.rooms.v1.RoomsService/ReportPeerStates",
    "spaces.rooms.v1.RoomsService/ReportSpeakingLevels",
    "spaces.rooms.v1.RoomsService/RequestMediaReconnect",
]
PAYMENTS_IDEMPOTENT = ["spaces.payments.v1.PaymentsService/CheckTicket"]
# One relay per (Space, edge): opening again replaces it, closing again succeeds.
MEDIA_IDEMPOTENT = [
    "spaces.media.v1.MediaService/OpenRelay",
    "spaces.media.v1.MediaService/CloseRelay",
]
_REPORT_TIMEOUT_S = 2.0


def _timestamp(unix: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix * 1e9))
    return stamp


def _participant(space: str, participant: str) -> str:
    return f"spaces/{space}/participants/{participant}"


class GrpcRooms:
    """Reports to rooms over its internal gRPC API.

    :param channel: a channel to rooms carrying media's service token.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = rooms_grpc.RoomsServiceStub(channel)

    async def report_peer_states(self, node: str, changes: Sequence[PeerChange]) -> None:
        """Send sessions that connected or closed, oldest first."""
        request = rooms_pb.ReportPeerStatesRequest(
            node=node,
            changes=[
                rooms_pb.PeerStateChange(
                    participant=_participant(change.space, change.participant),
                    media_session=f"{node}/sessions/{change.session}",
                    state=(
                        rooms_pb.PEER_STATE_CONNECTED
                        if change.connected
                        else rooms_pb.PEER_STATE_CLOSED
                    ),
                    observe_time=_timestamp(change.observe_time),
                )
                for change in changes
            ],
        )
        await self._stub.ReportPeerStates(request, timeout=_REPORT_TIMEOUT_S)

    async def report_levels(
        self, space: str, levels: Sequence[SpeakerLevel], observe_time: float
    ) -> None:
        """Send a Space's speaking levels (at most 64, loudest first)."""
        request = rooms_pb.ReportSpeakingLevelsRequest(
            name=f"spaces/{space}",
            levels=[
                rooms_res.SpeakingLevel(
                    participant=_participant(space, level.participant),
                    # rooms' scale is linear in the RFC 6464 value: (127 - dBov) / 127.
                    level=max(0.0, min(1.0, (level.dbov + 127.0) / 127.0)),
                    speaking=level.speaking,
                )
                for level in levels[:64]
            ],
            observe_time=_timestamp(observe_time),
        )
        try:
            await self._stub.ReportSpeakingLevels(request, timeout=_REPORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            # A Space that just ended refuses levels; that is not worth a loop restart.
            if error.code() not in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
            ):
                raise

    async def request_reconnect(
        self, space: str, participants: Sequence[str], *, draining: bool, from_node: str
    ) -> None:
        """Ask rooms to move participants off ``from_node``."""
        reason = (
            rooms_events.MEDIA_RECONNECT_REASON_NODE_DRAINING
            if draining
            else rooms_events.MEDIA_RECONNECT_REASON_NODE_FAILED
        )
        await self._stub.RequestMediaReconnect(
            rooms_pb.RequestMediaReconnectRequest(
                name=f"spaces/{space}",
                participants=[_participant(space, p) for p in participants],
                reason=reason,
                from_node=f"mediaNodes/{from_node}",
            ),
            timeout=10.0,
        )

    async def post_caption(self, space: str, segment: CaptionSegmentData) -> None:
        """Send a caption segment to the Space's watchers who turned captions on."""
        message = rooms_res.CaptionSegment(
            segment_id=segment.segment_id,
            speaker=_participant(space, segment.participant),
            text=segment.text,
            final=segment.final,
            language_code="en-US",
        )
        message.start_offset.FromNanoseconds(int(segment.start_offset_s * 1e9))
        message.end_offset.FromNanoseconds(int(segment.end_offset_s * 1e9))
        try:
            await self._stub.PostCaptionSegment(
                rooms_pb.PostCaptionSegmentRequest(name=f"spaces/{space}", segment=message),
                timeout=_REPORT_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() not in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
            ):
                raise


class GrpcSpaceAccess:
    """Whether the calling user may see a Space's recordings.

    :param rooms: channel to rooms (calls carry the user's own token).
    :param payments: channel to payments (calls carry media's service token).
    """

    def __init__(self, rooms: grpc.aio.Channel, payments: grpc.aio.Channel) -> None:
        self._rooms = rooms_grpc.RoomsServiceStub(rooms)
        self._payments = payments_grpc.PaymentsServiceStub(payments)

    async def check(self, space: str, user_id: str) -> None:
        """Return when the caller may see the Space's recordings.

        :raises NotFound: ``SPACE_NOT_FOUND`` when the Space is missing or hidden.
        :raises PermissionDenied: ``TICKET_REQUIRED``.
        :raises Unavailable: when rooms or payments cannot answer.
        """
        try:
            with call_as(CallIdentity.FORWARD_USER):
                response = await self._rooms.GetSpace(
                    rooms_pb.GetSpaceRequest(name=f"spaces/{space}"), timeout=5.0
                )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                raise NotFound("no such space", reason="SPACE_NOT_FOUND") from None
            raise Unavailable(f"rooms cannot answer: {error.details()}") from None
        found = response.space
        if not found.ticketed or found.host == f"users/{user_id}":
            return
        try:
            ticket = await self._payments.CheckTicket(
                payments_pb.CheckTicketRequest(space=f"spaces/{space}", user=f"users/{user_id}"),
                timeout=5.0,
            )
        except grpc.aio.AioRpcError as error:
            raise Unavailable(f"payments cannot answer: {error.details()}") from None
        if ticket.ticket_required and not ticket.has_ticket:
            raise PermissionDenied(
                "this space is ticketed; buy a ticket to hear its recordings",
                reason="TICKET_REQUIRED",
            )


_READ_RECORDING_S = 600.0
"""Longest read of a recording from another node (the caller's deadline caps it)."""


class GrpcNodeLink:
    """Calls to other media nodes, one channel per node address (opened on first use).

    :param issuer: media's service token issuer.
    """

    def __init__(self, issuer: ServiceTokenIssuer) -> None:
        self._issuer = issuer
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> media_grpc.MediaServiceAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = create_channel(
                address, idempotent_methods=MEDIA_IDEMPOTENT, token_issuer=self._issuer
            )
            self._channels[address] = channel
        return media_grpc.MediaServiceStub(channel)

    async def open_relay(
        self, address: str, space: str, edge_node: str, sdp_offer: str
    ) -> tuple[str, str]:
        """OpenRelay on the origin at ``address``."""
        response = await self._stub(address).OpenRelay(
            media_pb.OpenRelayRequest(
                space=f"spaces/{space}",
                edge_node=f"mediaNodes/{edge_node}",
                sdp_offer=sdp_offer,
                all_active_speakers=True,
            ),
            timeout=10.0,
        )
        return response.relay, response.sdp_answer

    async def close_relay(self, address: str, space: str, relay: str) -> None:
        """CloseRelay on the origin at ``address``."""
        await self._stub(address).CloseRelay(
            media_pb.CloseRelayRequest(space=f"spaces/{space}", relay=relay), timeout=5.0
        )

    async def read_recording(
        self, address: str, request: media_pb.ReadRecordingRequest
    ) -> AsyncIterator[media_pb.ReadRecordingResponse]:
        """ReadRecording on the node at ``address`` (the one holding the file), as the
        calling user: that node checks the user's access again.

        :raises Unavailable: when that node cannot serve it.
        """
        with call_as(CallIdentity.FORWARD_USER):
            call = self._stub(address).ReadRecording(request, timeout=_READ_RECORDING_S)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"the media node holding the recording cannot serve it: {error.details()}",
                reason="RECORDING_NODE_UNREACHABLE",
            ) from None

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
