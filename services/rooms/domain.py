"""The rules of Spaces, without I/O: lifecycle, roles, limits, moderation, visibility.

Every function here takes plain records and returns new ones (or raises a
:class:`~services.common.errors.ServiceError` with the reason the API promises), so the
rules are tested without a database and the store only persists what they decided.

Roles: one host; co-hosts (moderate with the host); speakers; listeners. "On stage" are
host, co-hosts and speakers. Moderators act on speakers and listeners; the host also on
co-hosts; nobody on the host.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum

from services.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)

logger = logging.getLogger(__name__)


# The enums mirror the proto enums value for value, so records convert without tables.
class State(IntEnum):
    """Space lifecycle (SpaceState)."""

    SCHEDULED = 1
    LIVE = 2
    ENDED = 3
    CANCELED = 4


class Visibility(IntEnum):
    """Who may see and join (SpaceVisibility)."""

    EVERYONE = 1
    FOLLOWED_BY_HOST = 2
    INVITED_ONLY = 3


class SpeakPermission(IntEnum):
    """Who may raise a hand (SpeakPermission)."""

    EVERYONE = 1
    FOLLOWED_BY_HOST = 2
    INVITED_ONLY = 3


class EndReason(IntEnum):
    """Why a Space is over (SpaceEndReason)."""

    NONE = 0
    HOST_ENDED = 1
    HOST_ABSENT = 2
    HOST_CANCELED = 3
    NOT_STARTED = 4


class Role(IntEnum):
    """A participant's role (ParticipantRole)."""

    HOST = 1
    CO_HOST = 2
    SPEAKER = 3
    LISTENER = 4

    @property
    def on_stage(self) -> bool:
        """Host, co-hosts and speakers may publish."""
        return self is not Role.LISTENER

    @property
    def moderates(self) -> bool:
        """Host and co-hosts moderate."""
        return self in (Role.HOST, Role.CO_HOST)

    @property
    def grant_name(self) -> str:
        """The role as media grants spell it."""
        return self.name.lower()


class InvitationKind(IntEnum):
    """What a pending invitation offers (InvitationKind)."""

    SPEAK = 1
    CO_HOST = 2


class HandLoweredReason(IntEnum):
    """Why a raised hand went down (HandLoweredReason)."""

    CANCELED = 1
    APPROVED = 2
    DENIED = 3
    SPEAK_PERMISSION_CHANGED = 4


class InvitationState(IntEnum):
    """Where an invitation stands (InvitationState)."""

    PENDING = 1
    ACCEPTED = 2
    DECLINED = 3
    WITHDRAWN = 4


class RecordingState(IntEnum):
    """Whether the Space is being recorded (RecordingState)."""

    NONE = 0
    ACTIVE = 1
    STOPPED = 2


class Actor(IntEnum):
    """Who the caller is in a Space, for authorization."""

    HOST = 1
    CO_HOST = 2
    SPEAKER = 3
    LISTENER = 4
    OUTSIDER = 5


@dataclass(frozen=True)
class Limits:
    """Stage limits (rooms settings)."""

    max_co_hosts: int = 2
    max_speakers: int = 10
    max_participants: int = 0


@dataclass(frozen=True)
class Pinned:
    """A pinned message or link."""

    text: str
    uri: str
    pinned_by: str
    pin_time: datetime


@dataclass(frozen=True)
class Space:
    """A Space as stored."""

    id: str
    host_id: str
    title: str
    topics: tuple[str, ...]
    state: State
    visibility: Visibility
    speak_permission: SpeakPermission
    ticketed: bool
    recording: bool
    create_time: datetime
    update_time: datetime
    scheduled_start_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    end_reason: EndReason = EndReason.NONE
    pinned: Pinned | None = None
    captions_available: bool = False
    recording_state: RecordingState = RecordingState.NONE
    origin_node: str = ""
    version: int = 1
    recording_name: str = ""

    @property
    def is_over(self) -> bool:
        """Ended or canceled."""
        return self.state in (State.ENDED, State.CANCELED)


@dataclass(frozen=True)
class Invitation:
    """A pending invitation to speak or co-host."""

    kind: InvitationKind
    inviter_id: str
    create_time: datetime


@dataclass(frozen=True)
class Participant:
    """A user in a Space. Rows outlive a leave (``active`` false) so revisions never repeat."""

    space_id: str
    user_id: str
    role: Role
    join_time: datetime
    muted: bool = True
    hand_raise_time: datetime | None = None
    captions_enabled: bool = False
    invitation: Invitation | None = None
    connected: bool = False
    active: bool = True
    role_time: datetime | None = None
    media_session: str = ""
    session_time: datetime | None = None
    disconnected_since: datetime | None = None
    revision: int = 1

    @property
    def hand_raised(self) -> bool:
        """A speak request is waiting."""
        return self.hand_raise_time is not None


@dataclass(frozen=True)
class Counts:
    """Active participants by role."""

    host: int = 0
    co_host: int = 0
    speaker: int = 0
    listener: int = 0

    @property
    def total(self) -> int:
        """Everyone."""
        return self.host + self.co_host + self.speaker + self.listener


@dataclass(frozen=True)
class Change:
    """What a moderation step decided: the participant after it, and what to announce.

    :ivar participant: the participant after the change.
    :ivar before: the participant before it.
    :ivar hand_lowered: a raised hand went down, and why.
    :ivar invitation: an invitation changed: (the invitation, its new state).
    :ivar media: media must learn the participant's new permissions.
    """

    participant: Participant
    before: Participant
    hand_lowered: HandLoweredReason | None = None
    invitation: tuple[Invitation, InvitationState] | None = None
    media: bool = False

    @property
    def role_changed(self) -> bool:
        """The role differs from before."""
        return self.participant.role is not self.before.role

    @property
    def mute_changed(self) -> bool:
        """The mute state differs from before."""
        return self.participant.muted is not self.before.muted


# --- errors -------------------------------------------------------------------------------


def space_not_found() -> NotFound:
    """The Space does not exist or is hidden from the caller (the two look the same)."""
    return NotFound("space not found", reason="SPACE_NOT_FOUND")


def participant_not_found() -> NotFound:
    """The user is not in the Space."""
    return NotFound("participant not found", reason="PARTICIPANT_NOT_FOUND")


def not_moderator() -> PermissionDenied:
    """Only the host and co-hosts may do this."""
    return PermissionDenied("only the host and co-hosts may do this", reason="NOT_MODERATOR")


def not_host() -> PermissionDenied:
    """Only the host may do this."""
    return PermissionDenied("only the host may do this", reason="NOT_HOST")


def not_participant() -> FailedPrecondition:
    """The caller has not joined."""
    return FailedPrecondition("join the Space first", reason="NOT_PARTICIPANT")


# --- lifecycle ----------------------------------------------------------------------------


def check_title(title: str) -> None:
    """Titles are 1 to 70 characters (the proto checks the upper bound)."""
    if not title.strip() or len(title) > 70:
        raise InvalidArgument(
            "title must be 1 to 70 characters",
            field_violations=[("space.title", "must be 1 to 70 characters")],
        )


def check_schedule(when: datetime, now: datetime, max_ahead: timedelta) -> None:
    """A scheduled start is in the future and at most ``max_ahead`` away."""
    if when <= now:
        raise InvalidArgument(
            "scheduled_start_time must be in the future",
            reason="SCHEDULE_IN_PAST",
            field_violations=[("space.scheduled_start_time", "must be in the future")],
        )
    if when - now > max_ahead:
        raise InvalidArgument(
            f"scheduled_start_time must be at most {max_ahead.days} days ahead",
            reason="SCHEDULE_TOO_FAR_AHEAD",
            field_violations=[("space.scheduled_start_time", "too far ahead")],
        )


def host_already_live(space_id: str) -> FailedPrecondition:
    """The host already hosts a live Space."""
    return FailedPrecondition(
        "you already host a live Space",
        reason="HOST_ALREADY_LIVE",
        metadata={"space": f"spaces/{space_id}"},
    )


def check_scheduled_limit(scheduled_count: int, limit: int) -> None:
    """A host has at most ``limit`` scheduled Spaces."""
    if scheduled_count >= limit:
        raise ResourceExhausted(
            f"you already have {limit} scheduled Spaces",
            reason="SCHEDULED_SPACE_LIMIT_REACHED",
            quota_subject="user",
            quota_description=f"{limit} scheduled Spaces per host",
        )


def require_live(space: Space) -> None:
    """The Space is on air."""
    if space.state is not State.LIVE:
        raise FailedPrecondition(
            "the Space is not live",
            reason="SPACE_NOT_LIVE",
            metadata={"state": f"SPACE_STATE_{space.state.name}"},
        )


def require_not_over(space: Space) -> None:
    """The Space is scheduled or live."""
    if space.is_over:
        raise FailedPrecondition("the Space is over", reason="SPACE_ENDED")


def start(space: Space, caller_id: str, now: datetime) -> Space | None:
    """Start a scheduled Space; ``None`` when it is already live (nothing to do)."""
    if caller_id != space.host_id:
        raise not_host()
    if space.state is State.LIVE:
        return None
    if space.state is not State.SCHEDULED:
        raise FailedPrecondition("the Space is over", reason="SPACE_NOT_SCHEDULED")
    return go_live(space, now)


def go_live(space: Space, now: datetime) -> Space:
    """The Space as it is the moment it goes live."""
    return dataclasses.replace(
        space,
        state=State.LIVE,
        start_time=now,
        update_time=now,
        recording_state=RecordingState.ACTIVE if space.recording else RecordingState.NONE,
        version=space.version + 1,
    )


def end(space: Space, caller_id: str | None, now: datetime, reason: EndReason) -> Space | None:
    """End a live Space; ``None`` when it already ended. ``caller_id`` None: rooms itself."""
    if caller_id is not None and caller_id != space.host_id:
        raise not_host()
    if space.state is State.ENDED:
        return None
    if space.state is not State.LIVE:
        raise FailedPrecondition(
            "the Space is not live",
            reason="SPACE_NOT_LIVE",
            metadata={"state": f"SPACE_STATE_{space.state.name}"},
        )
    return dataclasses.replace(
        space,
        state=State.ENDED,
        end_time=now,
        end_reason=reason,
        update_time=now,
        recording_state=RecordingState.STOPPED if space.recording else RecordingState.NONE,
        version=space.version + 1,
    )


def cancel(space: Space, caller_id: str | None, now: datetime, reason: EndReason) -> Space | None:
    """Cancel a scheduled Space; ``None`` when it already was canceled."""
    if caller_id is not None and caller_id != space.host_id:
        raise not_host()
    if space.state is State.CANCELED:
        return None
    if space.state is not State.SCHEDULED:
        raise FailedPrecondition("the Space is not scheduled", reason="SPACE_NOT_SCHEDULED")
    return dataclasses.replace(
        space,
        state=State.CANCELED,
        end_time=now,
        end_reason=reason,
        update_time=now,
        version=space.version + 1,
    )


@dataclass(frozen=True)
class SpaceUpdate:
    """The fields UpdateSpace may change; ``None`` means "not in the mask"."""

    title: str | None = None
    topics: tuple[str, ...] | None = None
    scheduled_start_time: datetime | None = None
    visibility: Visibility | None = None
    speak_permission: SpeakPermission | None = None


def update(
    space: Space,
    caller_id: str,
    change: SpaceUpdate,
    *,
    etag: str,
    now: datetime,
    max_ahead: timedelta,
) -> Space:
    """Apply UpdateSpace; return the Space after it."""
    if caller_id != space.host_id:
        raise not_host()
    require_not_over(space)
    if change.scheduled_start_time is not None:
        if space.state is not State.SCHEDULED:
            raise FailedPrecondition(
                "only a scheduled Space can be rescheduled", reason="SPACE_NOT_SCHEDULED"
            )
        check_schedule(change.scheduled_start_time, now, max_ahead)
    if etag and etag != etag_of(space):
        raise_etag_mismatch()
    if change.title is not None:
        check_title(change.title)
    return dataclasses.replace(
        space,
        title=change.title if change.title is not None else space.title,
        topics=change.topics if change.topics is not None else space.topics,
        scheduled_start_time=change.scheduled_start_time or space.scheduled_start_time,
        visibility=change.visibility or space.visibility,
        speak_permission=change.speak_permission or space.speak_permission,
        update_time=now,
        version=space.version + 1,
    )


def raise_etag_mismatch() -> None:
    """The Space changed since the caller read it."""
    raise Aborted("the Space changed since it was read", reason="ETAG_MISMATCH")


def etag_of(space: Space) -> str:
    """A checksum of the shared fields: the version counter, bumped on every such change."""
    return f'W/"{space.id}-{space.version}"'


# --- who is who -----------------------------------------------------------------------------


def actor_of(space: Space, user_id: str, participant: Participant | None) -> Actor:
    """The caller's standing in the Space."""
    if user_id == space.host_id:
        return Actor.HOST
    if participant is None or not participant.active:
        return Actor.OUTSIDER
    return Actor(participant.role.value)


def may_moderate(actor: Actor, target: Role) -> bool:
    """Host: anyone but the host; co-host: speakers and listeners; others: nobody."""
    if actor is Actor.HOST:
        return target is not Role.HOST
    if actor is Actor.CO_HOST:
        return target in (Role.SPEAKER, Role.LISTENER)
    return False


def require_moderator(actor: Actor) -> None:
    """The caller is the host or a co-host."""
    if actor not in (Actor.HOST, Actor.CO_HOST):
        raise not_moderator()


def require_target_moderatable(actor: Actor, target: Role) -> None:
    """Co-hosts cannot act on the host or other co-hosts."""
    if not may_moderate(actor, target):
        raise PermissionDenied(
            "co-hosts cannot moderate the host or other co-hosts",
            reason="CANNOT_MODERATE_TARGET",
        )


def require_active(participant: Participant | None) -> Participant:
    """The target is in the Space."""
    if participant is None or not participant.active:
        raise participant_not_found()
    return participant


def require_self_joined(participant: Participant | None) -> Participant:
    """The caller is in the Space."""
    if participant is None or not participant.active:
        raise not_participant()
    return participant


def _speaker_limit(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"the stage already has {limit} speakers",
        reason="SPEAKER_LIMIT_REACHED",
        quota_subject="space",
        quota_description=f"{limit} speakers per Space",
    )


def _co_host_limit(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"the Space already has {limit} co-hosts",
        reason="CO_HOST_LIMIT_REACHED",
        quota_subject="space",
        quota_description=f"{limit} co-hosts per Space",
    )


def _bump(p: Participant, **changes: object) -> Participant:
    return dataclasses.replace(p, revision=p.revision + 1, **changes)  # type: ignore[arg-type]


# --- joining and leaving ----------------------------------------------------------------------


def join(
    space: Space,
    user_id: str,
    existing: Participant | None,
    counts: Counts,
    limits: Limits,
    now: datetime,
) -> Participant:
    """The participant after JoinSpace (a rejoin keeps role and join time)."""
    require_live(space)
    if existing is not None and existing.active:
        return existing
    if limits.max_participants and counts.total >= limits.max_participants:
        raise ResourceExhausted(
            "the Space is full",
            reason="SPACE_FULL",
            quota_subject="space",
            quota_description=f"{limits.max_participants} participants per Space",
        )
    role = Role.HOST if user_id == space.host_id else Role.LISTENER
    if existing is not None:
        return _bump(
            existing,
            role=role,
            active=True,
            join_time=now,
            muted=True,
            hand_raise_time=None,
            invitation=None,
            captions_enabled=False,
            connected=False,
            role_time=now,
            disconnected_since=None,
        )
    return Participant(space_id=space.id, user_id=user_id, role=role, join_time=now, role_time=now)


def leave(participant: Participant) -> Participant:
    """The participant after leaving (or being dropped)."""
    if participant.role is Role.HOST:
        raise FailedPrecondition("the host ends the Space instead", reason="HOST_CANNOT_LEAVE")
    return _bump(
        participant,
        active=False,
        role=Role.LISTENER,
        muted=True,
        hand_raise_time=None,
        invitation=None,
        connected=False,
    )


def remove(
    space: Space,
    actor: Actor,
    actor_id: str,
    target: Participant | None,
    target_id: str,
) -> Participant:
    """RemoveParticipant: the participant after removal."""
    require_moderator(actor)
    if target_id == actor_id:
        raise InvalidArgument("use LeaveSpace to leave", reason="TARGET_IS_CALLER")
    require_live(space)
    target = require_active(target)
    require_target_moderatable(actor, target.role)
    return _bump(
        target,
        active=False,
        role=Role.LISTENER,
        muted=True,
        hand_raise_time=None,
        invitation=None,
        connected=False,
    )


# --- hands ----------------------------------------------------------------------------------


def request_to_speak(
    space: Space, me: Participant | None, *, host_follows_me: bool, now: datetime
) -> Participant:
    """RequestToSpeak: the caller's participant with the hand up."""
    require_live(space)
    me = require_self_joined(me)
    if me.role is not Role.LISTENER:
        raise FailedPrecondition("you are already on stage", reason="NOT_LISTENER")
    if me.hand_raised:
        return me
    if not may_raise_hand(space.speak_permission, host_follows_me=host_follows_me):
        raise PermissionDenied(
            "this Space does not take speak requests from you", reason="SPEAK_REQUESTS_RESTRICTED"
        )
    return _bump(me, hand_raise_time=now)


def may_raise_hand(permission: SpeakPermission, *, host_follows_me: bool) -> bool:
    """Whether the speak permission lets a listener raise a hand."""
    if permission is SpeakPermission.EVERYONE:
        return True
    if permission is SpeakPermission.FOLLOWED_BY_HOST:
        return host_follows_me
    return False


def cancel_speak_request(space: Space, me: Participant | None) -> Change:
    """CancelSpeakRequest: hand down (no change when it already is)."""
    require_live(space)
    me = require_self_joined(me)
    if not me.hand_raised:
        return Change(me, me)
    after = _bump(me, hand_raise_time=None)
    return Change(after, me, hand_lowered=HandLoweredReason.CANCELED)


def approve(
    space: Space, actor: Actor, target: Participant | None, counts: Counts, limits: Limits
) -> Change:
    """ApproveSpeaker: the listener becomes a (muted) speaker."""
    require_moderator(actor)
    require_live(space)
    target = require_active(target)
    if target.role is not Role.LISTENER or not target.hand_raised:
        raise FailedPrecondition("the participant's hand is not raised", reason="NO_SPEAK_REQUEST")
    if counts.speaker >= limits.max_speakers:
        raise _speaker_limit(limits.max_speakers)
    after = _bump(
        target,
        role=Role.SPEAKER,
        hand_raise_time=None,
        muted=True,
        invitation=None,
        role_time=None,
    )
    return Change(after, target, hand_lowered=HandLoweredReason.APPROVED, media=True)


def deny(space: Space, actor: Actor, target: Participant | None) -> Change:
    """DenySpeaker: the hand goes down, the listener stays a listener."""
    require_moderator(actor)
    require_live(space)
    target = require_active(target)
    if not target.hand_raised:
        raise FailedPrecondition("the participant's hand is not raised", reason="NO_SPEAK_REQUEST")
    after = _bump(target, hand_raise_time=None)
    return Change(after, target, hand_lowered=HandLoweredReason.DENIED)


def lower_hands_for_permission(
    permission: SpeakPermission, raised: list[Participant], followed_by_host: set[str]
) -> list[Change]:
    """SetSpeakPermission: the raised hands the new permission no longer allows."""
    changes = []
    for participant in raised:
        allowed = may_raise_hand(
            permission, host_follows_me=participant.user_id in followed_by_host
        )
        if not allowed:
            after = _bump(participant, hand_raise_time=None)
            changes.append(
                Change(after, participant, hand_lowered=HandLoweredReason.SPEAK_PERMISSION_CHANGED)
            )
    return changes


# --- invitations ----------------------------------------------------------------------------


def invite_to_speak(
    space: Space,
    actor: Actor,
    actor_id: str,
    target: Participant | None,
    counts: Counts,
    limits: Limits,
    now: datetime,
) -> Change:
    """InviteToSpeak: a pending invitation to speak (a co-host invitation is replaced)."""
    require_moderator(actor)
    require_live(space)
    target = require_active(target)
    if target.role is not Role.LISTENER:
        raise FailedPrecondition("the participant is already on stage", reason="NOT_LISTENER")
    if target.invitation is not None and target.invitation.kind is InvitationKind.SPEAK:
        return Change(target, target)
    if counts.speaker >= limits.max_speakers:
        raise _speaker_limit(limits.max_speakers)
    invitation = Invitation(InvitationKind.SPEAK, actor_id, now)
    after = _bump(target, invitation=invitation)
    return Change(after, target, invitation=(invitation, InvitationState.PENDING))


def accept_speak_invitation(
    space: Space, me: Participant | None, counts: Counts, limits: Limits
) -> Change:
    """AcceptSpeakInvitation: the caller becomes a muted speaker."""
    require_live(space)
    me = require_self_joined(me)
    invitation = me.invitation
    if invitation is None or invitation.kind is not InvitationKind.SPEAK:
        raise FailedPrecondition("no pending invitation to speak", reason="NO_PENDING_INVITATION")
    if me.role is not Role.LISTENER:
        # Came on stage another way meanwhile; the invitation has nothing left to offer.
        after = _bump(me, invitation=None)
        return Change(after, me, invitation=(invitation, InvitationState.ACCEPTED))
    if counts.speaker >= limits.max_speakers:
        raise _speaker_limit(limits.max_speakers)
    after = _bump(
        me, role=Role.SPEAKER, muted=True, invitation=None, hand_raise_time=None, role_time=None
    )
    return Change(
        after,
        me,
        invitation=(invitation, InvitationState.ACCEPTED),
        hand_lowered=HandLoweredReason.APPROVED if me.hand_raised else None,
        media=True,
    )


def decline_invitation(me: Participant | None, kind: InvitationKind) -> Change:
    """Decline*Invitation: drop a pending invitation of ``kind`` (none: no change)."""
    me = require_self_joined(me)
    invitation = me.invitation
    if invitation is None or invitation.kind is not kind:
        return Change(me, me)
    after = _bump(me, invitation=None)
    return Change(after, me, invitation=(invitation, InvitationState.DECLINED))


def revoke_speaker(space: Space, actor: Actor, actor_id: str, target: Participant | None) -> Change:
    """RevokeSpeaker: a speaker back to listener, or a pending speak invitation withdrawn."""
    target_is_self = target is not None and target.user_id == actor_id
    if not target_is_self:
        require_moderator(actor)
    require_live(space)
    target = require_active(target)
    invitation = target.invitation
    if target.role is Role.SPEAKER:
        after = _bump(target, role=Role.LISTENER, muted=True, role_time=None)
        return Change(after, target, media=True)
    if invitation is not None and invitation.kind is InvitationKind.SPEAK:
        after = _bump(target, invitation=None)
        return Change(after, target, invitation=(invitation, InvitationState.WITHDRAWN))
    raise FailedPrecondition(
        "the participant is not a speaker and has no invitation to speak", reason="NOT_SPEAKER"
    )


def add_co_host(
    space: Space,
    caller_id: str,
    target: Participant | None,
    target_id: str,
    counts: Counts,
    limits: Limits,
    now: datetime,
) -> Change:
    """AddCoHost: a pending invitation to co-host (a speak invitation is replaced)."""
    if caller_id != space.host_id:
        raise not_host()
    require_live(space)
    if target_id == caller_id:
        raise InvalidArgument("the host cannot invite themselves", reason="TARGET_IS_CALLER")
    target = require_active(target)
    if target.role is Role.CO_HOST:
        raise FailedPrecondition("already a co-host", reason="ALREADY_CO_HOST")
    if target.invitation is not None and target.invitation.kind is InvitationKind.CO_HOST:
        return Change(target, target)
    if counts.co_host >= limits.max_co_hosts:
        raise _co_host_limit(limits.max_co_hosts)
    invitation = Invitation(InvitationKind.CO_HOST, caller_id, now)
    after = _bump(target, invitation=invitation)
    return Change(after, target, invitation=(invitation, InvitationState.PENDING))


def accept_co_host_invitation(
    space: Space, me: Participant | None, counts: Counts, limits: Limits, now: datetime
) -> Change:
    """AcceptCoHostInvitation: the caller becomes a co-host."""
    require_live(space)
    me = require_self_joined(me)
    invitation = me.invitation
    if invitation is None or invitation.kind is not InvitationKind.CO_HOST:
        raise FailedPrecondition("no pending invitation to co-host", reason="NO_PENDING_INVITATION")
    if counts.co_host >= limits.max_co_hosts:
        raise _co_host_limit(limits.max_co_hosts)
    after = _bump(me, role=Role.CO_HOST, invitation=None, hand_raise_time=None, role_time=now)
    return Change(
        after,
        me,
        invitation=(invitation, InvitationState.ACCEPTED),
        hand_lowered=HandLoweredReason.APPROVED if me.hand_raised else None,
        media=True,
    )


def remove_co_host(
    space: Space,
    caller_id: str,
    target: Participant | None,
    counts: Counts,
    limits: Limits,
) -> Change:
    """RemoveCoHost: a co-host steps down to speaker (if a place is free) or listener."""
    target_is_self = target is not None and target.user_id == caller_id
    if caller_id != space.host_id and not target_is_self:
        raise not_host()
    require_live(space)
    target = require_active(target)
    invitation = target.invitation
    if target.role is Role.CO_HOST:
        role = Role.SPEAKER if counts.speaker < limits.max_speakers else Role.LISTENER
        after = _bump(target, role=role, muted=True if role is Role.LISTENER else target.muted)
        return Change(after, target, media=True)
    if invitation is not None and invitation.kind is InvitationKind.CO_HOST:
        after = _bump(target, invitation=None)
        return Change(after, target, invitation=(invitation, InvitationState.WITHDRAWN))
    raise FailedPrecondition(
        "the participant is not a co-host and has no invitation to co-host", reason="NOT_CO_HOST"
    )


# --- microphones ----------------------------------------------------------------------------


def mute(space: Space, actor: Actor, target: Participant | None) -> Change:
    """MuteParticipant: a moderator mutes someone on stage."""
    require_moderator(actor)
    require_live(space)
    target = require_active(target)
    require_target_moderatable(actor, target.role)
    if not target.role.on_stage:
        raise FailedPrecondition("the participant is a listener", reason="NOT_ON_STAGE")
    if target.muted:
        return Change(target, target)
    return Change(_bump(target, muted=True), target, media=True)


def set_own_mute(space: Space, me: Participant | None, muted: bool) -> Change:
    """SetOwnMute: only the participant unmutes themself."""
    require_live(space)
    me = require_self_joined(me)
    if not me.role.on_stage:
        raise FailedPrecondition("listeners cannot unmute", reason="NOT_ON_STAGE")
    if me.muted is muted:
        return Change(me, me)
    return Change(_bump(me, muted=muted), me, media=True)


# --- visibility -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    """What visibility depends on, for one user and one Space.

    :ivar user_id: the viewer.
    :ivar blocked: a block exists between the viewer and the host, either way.
    :ivar host_follows: the host follows the viewer.
    :ivar invited: the viewer is on the invite list.
    :ivar has_link: the viewer presented a valid join link for this Space.
    :ivar participant: the viewer is in the Space now (or is a co-host).
    """

    user_id: str
    blocked: bool = False
    host_follows: bool = False
    invited: bool = False
    has_link: bool = False
    participant: bool = False


def may_see(space: Space, viewer: Viewer) -> bool:
    """Whether ``viewer`` may see (and, rules permitting, join) the Space."""
    if viewer.user_id == space.host_id:
        return True
    if viewer.blocked:
        return False
    if viewer.participant or viewer.invited or viewer.has_link:
        return True
    if space.visibility is Visibility.EVERYONE:
        return True
    if space.visibility is Visibility.FOLLOWED_BY_HOST:
        return viewer.host_follows
    return False


def needs_follow_check(space: Space, viewer_id: str) -> bool:
    """Whether seeing the Space depends on the host following the viewer."""
    return viewer_id != space.host_id and space.visibility is Visibility.FOLLOWED_BY_HOST


def ticket_exempt(space: Space, user_id: str, *, invited: bool, on_stage: bool) -> bool:
    """The host, people on stage and invited users enter a ticketed Space without a ticket."""
    return user_id == space.host_id or invited or on_stage


# --- counts ---------------------------------------------------------------------------------


def counts_with(counts: Counts, before: Participant | None, after: Participant) -> Counts:
    """``counts`` after ``before`` became ``after`` (either may be inactive)."""
    values = {Role.HOST: counts.host, Role.CO_HOST: counts.co_host}
    values[Role.SPEAKER] = counts.speaker
    values[Role.LISTENER] = counts.listener
    if before is not None and before.active:
        values[before.role] -= 1
    if after.active:
        values[after.role] += 1
    return Counts(
        values[Role.HOST], values[Role.CO_HOST], values[Role.SPEAKER], values[Role.LISTENER]
    )
