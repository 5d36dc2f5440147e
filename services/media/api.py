"""The gRPC servicer of ``spaces.media.v1.MediaService``.

It decodes requests (protovalidate has already checked their rules), checks who calls
(apps negotiate their own sessions; the internal RPCs are for services, which the auth
interceptor enforces), and calls :class:`~services.media.node.MediaNode`. Refusals are
:class:`~services.common.errors.ServiceError` s; the error interceptor maps them.

Relays (``OpenRelay``/``CloseRelay``) are not served yet: a Space lives on its origin node
and placement sends every participant there, so nothing calls them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from spaces.media.v1 import media_resources_pb2 as res
from spaces.media.v1 import media_service_pb2 as pb
from spaces.media.v1 import media_service_pb2_grpc as pb_grpc

from services.common.auth import Principal
from services.common.context import current_principal
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unavailable,
)
from services.media.convert import node_stats, recording_message
from services.media.node import MediaNode
from services.media.registry import ParticipantPermissions

logger = logging.getLogger(__name__)

__all__ = ["MediaApi", "NodeRuntime", "SpaceAccess"]

_CHUNK_BYTES = 64 * 1024


class SpaceAccess(Protocol):
    """Whether the calling user may see a Space's recordings."""

    async def check(self, space: str, user_id: str) -> None:
        """Raise ``NOT_FOUND`` or ``PERMISSION_DENIED`` unless the user may."""


class NodeRuntime(Protocol):
    """Where the servicer finds the node and the access check (built at start-up)."""

    @property
    def node(self) -> MediaNode:
        """The started node."""

    @property
    def access(self) -> SpaceAccess:
        """The recordings' access check."""


def _user(principal: Principal) -> str:
    if not principal.is_user or principal.user_id is None:
        raise PermissionDenied("only apps open media sessions", reason="USER_REQUIRED")
    return principal.user_id


def _last(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _participant(name: str) -> tuple[str, str]:
    """``spaces/{space}/participants/{participant}`` → (space, participant)."""
    parts = name.split("/")
    return parts[1], parts[3]


class MediaApi(pb_grpc.MediaServiceServicer):
    """Implements MediaService over a :class:`MediaNode`.

    :param runtime: holds the node and the access check once the process has started.
    :param recordings_dir: where recording files are.
    """

    def __init__(self, runtime: NodeRuntime, recordings_dir: Path) -> None:
        self._runtime = runtime
        self._recordings_dir = recordings_dir

    @property
    def _node(self) -> MediaNode:
        return self._runtime.node

    @property
    def _access(self) -> SpaceAccess:
        return self._runtime.access

    # -- sessions (apps) -------------------------------------------------------------

    def _ice_servers(self) -> list[res.IceServer]:
        """The node's STUN/TURN servers as apps are told them."""
        return [
            res.IceServer(
                urls=list(server.urls),
                username=server.username or "",
                credential=server.credential or "",
            )
            for server in self._node.engine.config.ice_servers
        ]

    async def Negotiate(self, request: pb.NegotiateRequest, context: Any) -> pb.NegotiateResponse:
        user = _user(current_principal())
        result, record = await self._node.negotiate(
            user, request.node, request.grant, request.sdp_offer
        )
        return pb.NegotiateResponse(
            session=f"{self._node.name}/sessions/{result.session}",
            sdp_answer=result.sdp_answer,
            ice_servers=self._ice_servers(),
            recording=record.record,
            slot_count=result.slot_count,
            may_publish=result.may_publish,
        )

    def _session_id(self, name: str) -> str:
        """The session id of ``mediaNodes/{node}/sessions/{id}`` on this node."""
        parts = name.split("/")
        if parts[1] != self._node.node_id:
            raise NotFound("no such media session on this node", reason="SESSION_NOT_FOUND")
        return parts[3]

    def _caller(self) -> str | None:
        """The calling user's id; ``None`` for a service (which may act on any session)."""
        principal = current_principal()
        return principal.user_id if principal.is_user else None

    async def AddIceCandidate(
        self, request: pb.AddIceCandidateRequest, context: Any
    ) -> pb.AddIceCandidateResponse:
        session = self._node.owned_session(self._session_id(request.session), self._caller())
        await session.peer.add_ice_candidate(
            request.candidate,
            request.sdp_mid if request.HasField("sdp_mid") else None,
            request.sdp_m_line_index if request.HasField("sdp_m_line_index") else None,
        )
        return pb.AddIceCandidateResponse()

    async def RestartIce(
        self, request: pb.RestartIceRequest, context: Any
    ) -> pb.RestartIceResponse:
        session = self._node.owned_session(self._session_id(request.session), self._caller())
        # Same session, slots, permissions and grant: only ICE starts over (the node
        # moves the session to the app's new address once it nominates a pair there).
        answer = await self._node.engine.restart_ice(session.id, request.sdp_offer)
        return pb.RestartIceResponse(
            sdp_answer=answer,
            ice_servers=self._ice_servers(),
        )

    async def LeaveSession(
        self, request: pb.LeaveSessionRequest, context: Any
    ) -> pb.LeaveSessionResponse:
        session_id = self._session_id(request.session)
        if self._node.engine.session(session_id) is not None:
            self._node.owned_session(session_id, self._caller())
            await self._node.engine.leave(session_id)
        return pb.LeaveSessionResponse()

    # -- recordings (apps) -------------------------------------------------------------

    async def _recordings(self, space: str) -> list[tuple[res.Recording, dict[str, Any]]]:
        """The Space's recordings as messages, each with its registry description (which
        names its node); expired ones are gone for apps (their node deletes the files)."""
        now = time.time()
        return [
            (recording_message(space, item), item)
            for item in await self._node.registry.recordings(space)
            if item.get("expire_time") is None or float(item["expire_time"]) > now
        ]

    async def _recording_item(self, name: str) -> tuple[res.Recording, dict[str, Any]]:
        """The recording as a message and as the registry describes it."""
        space, recording_id = name.split("/")[1], _last(name)
        await self._access.check(space, _user(current_principal()))
        for recording, item in await self._recordings(space):
            if recording.name == name:
                return recording, item
        raise NotFound(
            "no such recording", reason="RECORDING_NOT_FOUND", metadata={"id": recording_id}
        )

    async def _recording(self, name: str) -> res.Recording:
        return (await self._recording_item(name))[0]

    async def ListRecordings(
        self, request: pb.ListRecordingsRequest, context: Any
    ) -> pb.ListRecordingsResponse:
        space = _last(request.parent)
        await self._access.check(space, _user(current_principal()))
        # A Space has a handful of recordings at most: one page holds them all.
        return pb.ListRecordingsResponse(recordings=[r for r, _ in await self._recordings(space)])

    async def GetRecording(
        self, request: pb.GetRecordingRequest, context: Any
    ) -> pb.GetRecordingResponse:
        return pb.GetRecordingResponse(recording=await self._recording(request.name))

    async def ReadRecording(
        self, request: pb.ReadRecordingRequest, context: Any
    ) -> AsyncIterator[pb.ReadRecordingResponse]:
        recording, item = await self._recording_item(request.name)
        if recording.state != res.Recording.STATE_READY:
            raise FailedPrecondition("the recording is not ready", reason="RECORDING_NOT_READY")
        path = self._recordings_dir / recording.space.split("/")[1] / f"{_last(recording.name)}.ogg"
        if not path.exists():
            # Files live on the disk of the node that recorded them (unless the nodes
            # share one volume at MEDIA_RECORDINGS_DIR): that node serves the read.
            if request.offset >= recording.size_bytes:
                raise OutOfRange(
                    "offset is at or past the end of the recording", reason="OFFSET_OUT_OF_RANGE"
                )
            address = await self._recording_node(str(item.get("node", "")))
            if address is None:
                raise Unavailable(
                    "the recording's file is not on this media node, and the node that "
                    "recorded it is gone",
                    reason="RECORDING_NOT_LOCAL",
                )
            links = self._node.nodes
            assert links is not None
            async for response in links.read_recording(address, request):
                yield response
            return
        size = path.stat().st_size
        if request.offset >= size:
            raise OutOfRange(
                "offset is at or past the end of the recording", reason="OFFSET_OUT_OF_RANGE"
            )
        end = size if request.length == 0 else min(size, request.offset + request.length)
        offset = request.offset
        yield pb.ReadRecordingResponse(recording=recording, offset=offset)
        with path.open("rb") as file:
            file.seek(offset)
            while offset < end:
                data = file.read(min(_CHUNK_BYTES, end - offset))
                if not data:
                    break
                yield pb.ReadRecordingResponse(offset=offset, data=data)
                offset += len(data)

    async def _recording_node(self, node_id: str) -> str | None:
        """The gRPC address of the live node that recorded a file, if it is another."""
        if not node_id or node_id == self._node.node_id or self._node.nodes is None:
            return None
        return await self._node.registry.address_of(node_id)

    # -- internal: rooms ----------------------------------------------------------------

    async def OpenSpace(self, request: pb.OpenSpaceRequest, context: Any) -> pb.OpenSpaceResponse:
        origin = await self._node.open_space(_last(request.space), record=request.record)
        return pb.OpenSpaceResponse(origin_node=f"mediaNodes/{origin}")

    async def PlaceParticipant(
        self, request: pb.PlaceParticipantRequest, context: Any
    ) -> pb.PlaceParticipantResponse:
        space, participant = _participant(request.participant)
        avoid = request.avoid_node.removeprefix("mediaNodes/") or None
        placement = await self._node.place(
            space, participant, may_publish=request.may_publish, avoid=avoid
        )
        return pb.PlaceParticipantResponse(
            node=f"mediaNodes/{placement.node.node_id}",
            endpoint=placement.node.endpoint,
            node_role=res.NODE_ROLE_ORIGIN if placement.origin else res.NODE_ROLE_EDGE,
        )

    async def UpdatePermissions(
        self, request: pb.UpdatePermissionsRequest, context: Any
    ) -> pb.UpdatePermissionsResponse:
        space, participant = _participant(request.participant)
        applied, sessions = await self._node.update_permissions(
            space,
            participant,
            ParticipantPermissions(
                may_publish=request.may_publish,
                muted=request.muted,
                removed=request.removed,
                revision=request.revision,
            ),
        )
        return pb.UpdatePermissionsResponse(applied=applied, session_count=sessions)

    async def CloseSpace(
        self, request: pb.CloseSpaceRequest, context: Any
    ) -> pb.CloseSpaceResponse:
        space = _last(request.space)
        closed = await self._node.close_space(space)
        return pb.CloseSpaceResponse(
            recordings=[r for r, _ in await self._recordings(space)], closed_session_count=closed
        )

    async def OpenRelay(self, request: pb.OpenRelayRequest, context: Any) -> pb.OpenRelayResponse:
        if not request.all_active_speakers:
            raise InvalidArgument(
                "this node relays the active speakers only (all_active_speakers)",
                reason="FIXED_RELAYS_UNSUPPORTED",
            )
        space = _last(request.space)
        result = await self._node.open_relay(
            space, request.edge_node.removeprefix("mediaNodes/"), request.sdp_offer
        )
        session = self._node.engine.session(result.session)
        streams = []
        if session is not None:
            speakers = self._node.engine.slot_speakers(space, session.participant)
            for index, line in enumerate(session.layout.slots):
                speaker = speakers[index] if index < len(speakers) else None
                streams.append(
                    res.RelayStream(
                        participant=f"spaces/{space}/participants/{speaker}" if speaker else "",
                        mid=line.mid,
                        ssrc=session.room.slot_ssrcs[index],
                    )
                )
        return pb.OpenRelayResponse(
            relay=result.session, sdp_answer=result.sdp_answer, streams=streams
        )

    async def CloseRelay(
        self, request: pb.CloseRelayRequest, context: Any
    ) -> pb.CloseRelayResponse:
        await self._node.close_served_relay(_last(request.space), request.relay)
        return pb.CloseRelayResponse()

    # -- internal: operations ---------------------------------------------------------

    async def GetNodeStats(
        self, request: pb.GetNodeStatsRequest, context: Any
    ) -> pb.GetNodeStatsResponse:
        node_id = request.node.removeprefix("mediaNodes/")
        if not node_id or node_id == self._node.node_id:
            return pb.GetNodeStatsResponse(stats=node_stats(self._node.info()))
        found = await self._node.registry.node(node_id)
        if found is None:
            raise NotFound("no such media node", reason="NODE_NOT_FOUND")
        return pb.GetNodeStatsResponse(stats=node_stats(found))

    async def DrainNode(self, request: pb.DrainNodeRequest, context: Any) -> pb.DrainNodeResponse:
        node_id = request.node.removeprefix("mediaNodes/")
        grace = request.grace.ToTimedelta().total_seconds() if request.HasField("grace") else None
        if node_id == self._node.node_id:
            await self._node.drain(grace)
            return pb.DrainNodeResponse(stats=node_stats(self._node.info()))
        found = await self._node.registry.node(node_id)
        if found is None:
            raise NotFound("no such media node", reason="NODE_NOT_FOUND")
        await self._node.registry.publish_control(
            {"kind": "drain", "node": node_id, "grace": grace}
        )
        return pb.DrainNodeResponse(stats=node_stats(found))
