"""The gRPC servicer of ``spaces.rooms.v1.RoomsService``: decode, authorize, delegate.

Requests arrive validated (protovalidate interceptor) and authenticated (the principal is
in the call context). Each handler turns resource names into ids, resolves ``me``, and
hands the work to :class:`~services.rooms.app.Rooms`; errors are
:class:`~services.common.errors.ServiceError` s the error interceptor maps to statuses.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message
from spaces.rooms.v1 import rooms_service_pb2 as pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as pb_grpc

from services.common import context
from services.common.errors import InvalidArgument, PermissionDenied
from services.rooms import convert, domain
from services.rooms.app import LiveWatch, Rooms
from services.rooms.domain import InvitationKind, Role, SpeakPermission, State, Visibility

logger = logging.getLogger(__name__)

__all__ = ["RoomsApi", "add_to_server", "encode_response"]

ME = "me"
SERVICE = "spaces.rooms.v1.RoomsService"


def _caller() -> str | None:
    """The calling user's id; None for a service."""
    principal = context.current_principal()
    return principal.user_id if principal.is_user else None


def _user_caller() -> str:
    """The calling user's id; services may not act as a user here."""
    caller = _caller()
    if caller is None:
        # The caller is implicitly "me" here; a service token has no "me".
        raise InvalidArgument("this method needs a user token", reason="ME_WITHOUT_USER")
    return caller


def _resolve(segment: str) -> str:
    """A user id, with ``me`` replaced by the caller."""
    if segment != ME:
        return segment
    caller = _caller()
    if caller is None:
        raise InvalidArgument("'me' needs a user token", reason="ME_WITHOUT_USER")
    return caller


def _space_id(name: str) -> str:
    """``spaces/{space}`` → id."""
    return name.split("/")[1]


def _participant(name: str) -> tuple[str, str]:
    """``spaces/{space}/participants/{participant}`` → (space id, user id)."""
    parts = name.split("/")
    return parts[1], _resolve(parts[3])


class RoomsApi(pb_grpc.RoomsServiceServicer):
    """RoomsService.

    Built before start-up; :meth:`attach` hands it the use cases (the readiness gate
    keeps calls out until then).
    """

    def __init__(self) -> None:
        self._attached: tuple[Rooms, LiveWatch] | None = None

    def attach(self, rooms: Rooms, live: LiveWatch) -> None:
        """Give the servicer its use cases once start-up opened what they need."""
        self._attached = (rooms, live)

    @property
    def _rooms(self) -> Rooms:
        if self._attached is None:
            raise RuntimeError("RoomsApi used before attach()")
        return self._attached[0]

    @property
    def _live(self) -> LiveWatch:
        if self._attached is None:
            raise RuntimeError("RoomsApi used before attach()")
        return self._attached[1]

    # --- lifecycle --------------------------------------------------------------------------

    async def CreateSpace(self, request: pb.CreateSpaceRequest, ctx: Any) -> pb.CreateSpaceResponse:
        return await self._rooms.create_space(_user_caller(), request)

    async def GetSpace(self, request: pb.GetSpaceRequest, ctx: Any) -> pb.GetSpaceResponse:
        space = await self._rooms.get_space(
            _caller(), _space_id(request.name), request.join_link_token
        )
        return pb.GetSpaceResponse(space=space)

    async def ListSpaces(self, request: pb.ListSpacesRequest, ctx: Any) -> pb.ListSpacesResponse:
        host = _resolve(request.host.split("/")[1]) if request.host else None
        return await self._rooms.list_spaces(
            _caller(),
            host,
            [State(s) for s in request.states],
            request.page_size,
            request.page_token,
        )

    async def UpdateSpace(self, request: pb.UpdateSpaceRequest, ctx: Any) -> pb.UpdateSpaceResponse:
        paths = set(request.update_mask.paths)
        given = request.space
        change = domain.SpaceUpdate(
            title=given.title if "title" in paths else None,
            topics=tuple(given.topics) if "topics" in paths else None,
            scheduled_start_time=given.scheduled_start_time.ToDatetime(tzinfo=UTC)
            if "scheduled_start_time" in paths
            else None,
            visibility=Visibility(given.visibility) if "visibility" in paths else None,
            speak_permission=SpeakPermission(given.speak_permission)
            if "speak_permission" in paths
            else None,
        )
        space = await self._rooms.update_space(
            _user_caller(), _space_id(given.name), change, given.etag
        )
        return pb.UpdateSpaceResponse(space=space)

    async def StartSpace(self, request: pb.StartSpaceRequest, ctx: Any) -> pb.StartSpaceResponse:
        return pb.StartSpaceResponse(
            space=await self._rooms.start_space(_user_caller(), _space_id(request.name))
        )

    async def EndSpace(self, request: pb.EndSpaceRequest, ctx: Any) -> pb.EndSpaceResponse:
        return pb.EndSpaceResponse(
            space=await self._rooms.end_space(_user_caller(), _space_id(request.name))
        )

    async def CancelSpace(self, request: pb.CancelSpaceRequest, ctx: Any) -> pb.CancelSpaceResponse:
        return pb.CancelSpaceResponse(
            space=await self._rooms.cancel_space(_user_caller(), _space_id(request.name))
        )

    # --- joining ----------------------------------------------------------------------------

    async def JoinSpace(self, request: pb.JoinSpaceRequest, ctx: Any) -> pb.JoinSpaceResponse:
        return await self._rooms.join(_user_caller(), request, _space_id(request.name))

    async def LeaveSpace(self, request: pb.LeaveSpaceRequest, ctx: Any) -> pb.LeaveSpaceResponse:
        await self._rooms.leave_space(_user_caller(), _space_id(request.name))
        return pb.LeaveSpaceResponse()

    async def GetParticipant(
        self, request: pb.GetParticipantRequest, ctx: Any
    ) -> pb.GetParticipantResponse:
        space_id, user_id = _participant(request.name)
        participant = await self._rooms.get_participant(_caller(), space_id, user_id)
        return pb.GetParticipantResponse(participant=participant)

    async def ListParticipants(
        self, request: pb.ListParticipantsRequest, ctx: Any
    ) -> pb.ListParticipantsResponse:
        return await self._rooms.list_participants(
            _caller(),
            _space_id(request.parent),
            [Role(r) for r in request.roles],
            request.hand_raised_only,
            request.page_size,
            request.page_token,
        )

    # --- hands and invitations ----------------------------------------------------------------

    async def RequestToSpeak(
        self, request: pb.RequestToSpeakRequest, ctx: Any
    ) -> pb.RequestToSpeakResponse:
        p = await self._rooms.request_to_speak(_user_caller(), _space_id(request.name))
        return pb.RequestToSpeakResponse(participant=convert.participant_pb(p))

    async def CancelSpeakRequest(
        self, request: pb.CancelSpeakRequestRequest, ctx: Any
    ) -> pb.CancelSpeakRequestResponse:
        p = await self._rooms.cancel_speak_request(_user_caller(), _space_id(request.name))
        return pb.CancelSpeakRequestResponse(participant=convert.participant_pb(p))

    async def ApproveSpeaker(
        self, request: pb.ApproveSpeakerRequest, ctx: Any
    ) -> pb.ApproveSpeakerResponse:
        caller = _user_caller()
        space_id, target = _participant(request.name)
        p = await self._rooms.approve(caller, space_id, target)
        return pb.ApproveSpeakerResponse(participant=convert.participant_pb(p))

    async def DenySpeaker(self, request: pb.DenySpeakerRequest, ctx: Any) -> pb.DenySpeakerResponse:
        caller = _user_caller()
        space_id, target = _participant(request.name)
        p = await self._rooms.deny(caller, space_id, target)
        return pb.DenySpeakerResponse(participant=convert.participant_pb(p))

    async def InviteToSpeak(
        self, request: pb.InviteToSpeakRequest, ctx: Any
    ) -> pb.InviteToSpeakResponse:
        caller = _user_caller()
        space_id, target = _participant(request.name)
        p = await self._rooms.invite_to_speak(caller, space_id, target)
        return pb.InviteToSpeakResponse(participant=convert.participant_pb(p))

    async def AcceptSpeakInvitation(
        self, request: pb.AcceptSpeakInvitationRequest, ctx: Any
    ) -> pb.AcceptSpeakInvitationResponse:
        p = await self._rooms.accept_speak(_user_caller(), _space_id(request.name))
        return pb.AcceptSpeakInvitationResponse(participant=convert.participant_pb(p))

    async def DeclineSpeakInvitation(
        self, request: pb.DeclineSpeakInvitationRequest, ctx: Any
    ) -> pb.DeclineSpeakInvitationResponse:
        p = await self._rooms.decline(_user_caller(), _space_id(request.name), InvitationKind.SPEAK)
        return pb.DeclineSpeakInvitationResponse(participant=convert.participant_pb(p))

    async def RevokeSpeaker(
        self, request: pb.RevokeSpeakerRequest, ctx: Any
    ) -> pb.RevokeSpeakerResponse:
        caller = _user_caller()
        space_id, target = _participant(request.name)
        p = await self._rooms.revoke_speaker(caller, space_id, target)
        return pb.RevokeSpeakerResponse(participant=convert.participant_pb(p))

    async def AddCoHost(self, request: pb.AddCoHostRequest, ctx: Any) -> pb.AddCoHostResponse:
        caller = _user_caller()
        space_id, target = _participant(request.name)
        p = await self._rooms.add_co_host(caller, space_id, target)
        return pb.AddCoHostResponse(participant=convert.participant_pb(p))

    async def AcceptCoHostInvitation(
        self, request: pb.AcceptCoHostInvitationRequest, ctx: Any
    ) -> pb.AcceptCoHostInvitationResponse:
        p = await self._rooms.accept_co_host(_user_caller(), _space_id(request.name))
        return pb.AcceptCoHostInvitationResponse(participant=convert.participant_pb(p))

    async def DeclineCoHostInvitation(
        self, request: pb.DeclineCoHostInvitationRequest, ctx: Any
    ) -> pb.DeclineCoHostInvitationResponse:
        p = await self._rooms.decline(
            _user_caller(), _space_id(request.name), InvitationKind.CO_HOST
        )
        return pb.DeclineCoHostInvitationResponse(participant=convert.participant_pb(p))

    async def RemoveCoHost(
        self, request: pb.RemoveCoHostRequest, ctx: Any
    ) -> pb.RemoveCoHostResponse:
        caller = _user_caller()
        space_id, target = _participant(request.name)
        p = await self._rooms.remove_co_host(caller, space_id, target)
        return pb.RemoveCoHostResponse(participant=convert.participant_pb(p))

    # --- microphones and removal --------------------------------------------------------------

    async def MuteParticipant(
        self, request: pb.MuteParticipantRequest, ctx: Any
    ) -> pb.MuteParticipantResponse:
        caller = _user_caller()
        space_id, target = _participant(request.name)
        p = await self._rooms.mute(caller, space_id, target)
        return pb.MuteParticipantResponse(participant=convert.participant_pb(p))

    async def SetOwnMute(self, request: pb.SetOwnMuteRequest, ctx: Any) -> pb.SetOwnMuteResponse:
        p = await self._rooms.set_own_mute(_user_caller(), _space_id(request.name), request.muted)
        return pb.SetOwnMuteResponse(participant=convert.participant_pb(p))

    async def RemoveParticipant(
        self, request: pb.RemoveParticipantRequest, ctx: Any
    ) -> pb.RemoveParticipantResponse:
        caller = _user_caller()
        space_id, target = _participant(request.name)
        await self._rooms.remove_participant(caller, space_id, target, request.block_from_space)
        return pb.RemoveParticipantResponse()

    async def SetSpeakPermission(
        self, request: pb.SetSpeakPermissionRequest, ctx: Any
    ) -> pb.SetSpeakPermissionResponse:
        space = await self._rooms.set_speak_permission(
            _user_caller(), _space_id(request.name), SpeakPermission(request.speak_permission)
        )
        return pb.SetSpeakPermissionResponse(space=space)

    async def SetCaptionsEnabled(
        self, request: pb.SetCaptionsEnabledRequest, ctx: Any
    ) -> pb.SetCaptionsEnabledResponse:
        p = await self._rooms.set_captions(_user_caller(), _space_id(request.name), request.enabled)
        return pb.SetCaptionsEnabledResponse(participant=convert.participant_pb(p))

    # --- invitations, links, pins -------------------------------------------------------------

    async def InviteUsers(self, request: pb.InviteUsersRequest, ctx: Any) -> pb.InviteUsersResponse:
        users = [_resolve(name.split("/")[1]) for name in request.users]
        count = await self._rooms.invite_users(_user_caller(), _space_id(request.name), users)
        return pb.InviteUsersResponse(invited_user_count=count)

    async def CreateJoinLink(
        self, request: pb.CreateJoinLinkRequest, ctx: Any
    ) -> pb.CreateJoinLinkResponse:
        ttl = request.ttl.ToTimedelta() if request.HasField("ttl") else timedelta(hours=24)
        link = await self._rooms.create_join_link(_user_caller(), _space_id(request.name), ttl)
        return pb.CreateJoinLinkResponse(join_link=link)

    async def PinMessage(self, request: pb.PinMessageRequest, ctx: Any) -> pb.PinMessageResponse:
        pinned = await self._rooms.pin_message(
            _user_caller(), _space_id(request.name), request.text, request.uri
        )
        return pb.PinMessageResponse(pinned_message=pinned)

    async def SendReaction(
        self, request: pb.SendReactionRequest, ctx: Any
    ) -> pb.SendReactionResponse:
        await self._rooms.send_reaction(_user_caller(), _space_id(request.name), request.emoji)
        return pb.SendReactionResponse()

    async def CreateReminder(
        self, request: pb.CreateReminderRequest, ctx: Any
    ) -> pb.CreateReminderResponse:
        reminder = await self._rooms.create_reminder(_user_caller(), _space_id(request.parent))
        return pb.CreateReminderResponse(reminder=reminder)

    async def DeleteReminder(
        self, request: pb.DeleteReminderRequest, ctx: Any
    ) -> pb.DeleteReminderResponse:
        caller = _user_caller()
        parts = request.name.split("/")
        if _resolve(parts[3]) != caller:
            raise PermissionDenied("the reminder belongs to another user", reason="NOT_SELF")
        await self._rooms.delete_reminder(caller, parts[1])
        return pb.DeleteReminderResponse()

    async def ReportSpace(self, request: pb.ReportSpaceRequest, ctx: Any) -> pb.ReportSpaceResponse:
        report_id = await self._rooms.report(
            _user_caller(), _space_id(request.name), "", request.reason, request.note
        )
        return pb.ReportSpaceResponse(report_id=report_id)

    async def ReportParticipant(
        self, request: pb.ReportParticipantRequest, ctx: Any
    ) -> pb.ReportParticipantResponse:
        caller = _user_caller()
        space_id, target = _participant(request.name)
        report_id = await self._rooms.report(caller, space_id, target, request.reason, request.note)
        return pb.ReportParticipantResponse(report_id=report_id)

    # --- streams and feeds --------------------------------------------------------------------

    async def WatchSpace(self, request: pb.WatchSpaceRequest, ctx: Any) -> AsyncIterator[bytes]:  # type: ignore[override]
        space_id = _space_id(request.name)
        await self._rooms.seen(space_id, _caller())
        async for message in self._live.watch(
            space_id, request.resume_token, context.current_principal()
        ):
            yield message

    async def GetDiscoveryFeed(
        self, request: pb.GetDiscoveryFeedRequest, ctx: Any
    ) -> pb.GetDiscoveryFeedResponse:
        owner = _resolve(request.name.split("/")[1])
        caller = _caller()
        if caller is not None and owner != caller:
            raise PermissionDenied("a feed is only for its owner", reason="NOT_SELF")
        return await self._rooms.discovery_feed(owner, request.page_size, request.page_token)

    # --- internal -----------------------------------------------------------------------------

    async def PostCaptionSegment(
        self, request: pb.PostCaptionSegmentRequest, ctx: Any
    ) -> pb.PostCaptionSegmentResponse:
        sequence = await self._rooms.post_caption(_space_id(request.name), request.segment)
        return pb.PostCaptionSegmentResponse(sequence=sequence)

    async def ReportSpeakingLevels(
        self, request: pb.ReportSpeakingLevelsRequest, ctx: Any
    ) -> pb.ReportSpeakingLevelsResponse:
        await self._rooms.report_levels(
            _space_id(request.name),
            list(request.levels),
            request.observe_time.ToDatetime(tzinfo=UTC),
        )
        return pb.ReportSpeakingLevelsResponse()

    async def ReportPeerStates(
        self, request: pb.ReportPeerStatesRequest, ctx: Any
    ) -> pb.ReportPeerStatesResponse:
        applied = await self._rooms.report_peer_states(list(request.changes))
        return pb.ReportPeerStatesResponse(applied_count=applied)

    async def RequestMediaReconnect(
        self, request: pb.RequestMediaReconnectRequest, ctx: Any
    ) -> pb.RequestMediaReconnectResponse:
        users = [name.split("/")[3] for name in request.participants]
        notified = await self._rooms.request_reconnect(
            _space_id(request.name),
            users,
            request.reason,
            request.from_node.removeprefix("mediaNodes/"),
        )
        return pb.RequestMediaReconnectResponse(notified_count=notified)


def encode_response(message: Message | bytes) -> bytes:
    """Response serializer passing pre-encoded messages through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Capture:
    """Stands in for a server to catch the generated registration's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        del handlers  # rebuilt from the registered ones

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.handlers = dict(handlers)


def add_to_server(servicer: RoomsApi, server: grpc.aio.Server) -> None:
    """``add_RoomsServiceServicer_to_server``, with WatchSpace sending pre-encoded bytes.

    A Space's live response is the same for each of its unfiltered watchers; the hub
    serializes it once (:meth:`~services.rooms.live.LiveHub.watch_encoded`) and gRPC
    passes the bytes through instead of serializing a message per watcher.
    """
    capture = _Capture()
    pb_grpc.add_RoomsServiceServicer_to_server(servicer, capture)  # type: ignore[arg-type]
    handlers = capture.handlers
    watch = handlers["WatchSpace"]
    assert watch.unary_stream is not None
    handlers["WatchSpace"] = grpc.unary_stream_rpc_method_handler(
        watch.unary_stream,
        request_deserializer=watch.request_deserializer,
        response_serializer=encode_response,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # As the generated code does (grpcio >= 1.63; the stubs do not know it yet).
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]
