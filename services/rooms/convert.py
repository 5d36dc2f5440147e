"""Records to protos: resources, live events and outbox events (pure).

Fields shown only to some viewers (raised hands, invitations, captions) are filled by
``for_viewer`` flags, so one record renders right for the host and for a listener.
"""

from __future__ import annotations

import logging
from datetime import datetime

from google.protobuf import timestamp_pb2
from spaces.rooms.v1 import rooms_events_pb2 as ev
from spaces.rooms.v1 import rooms_resources_pb2 as res

from services.rooms.domain import (
    Change,
    Counts,
    EndReason,
    Invitation,
    InvitationState,
    Participant,
    Pinned,
    Role,
    Space,
    State,
    etag_of,
)

logger = logging.getLogger(__name__)


def ts(when: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None for None."""
    if when is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def space_name(space_id: str) -> str:
    """``spaces/{space}``."""
    return f"spaces/{space_id}"


def participant_name(space_id: str, user_id: str) -> str:
    """``spaces/{space}/participants/{participant}``."""
    return f"spaces/{space_id}/participants/{user_id}"


def user_name(user_id: str) -> str:
    """``users/{user}``."""
    return f"users/{user_id}"


def counts_pb(counts: Counts) -> res.ParticipantCounts:
    """ParticipantCounts."""
    return res.ParticipantCounts(
        host_count=counts.host,
        co_host_count=counts.co_host,
        speaker_count=counts.speaker,
        listener_count=counts.listener,
        total_count=counts.total,
    )


def pinned_pb(pinned: Pinned | None) -> res.PinnedMessage | None:
    """PinnedMessage, or None when nothing is pinned."""
    if pinned is None:
        return None
    return res.PinnedMessage(
        text=pinned.text,
        uri=pinned.uri,
        pinned_by=user_name(pinned.pinned_by),
        pin_time=ts(pinned.pin_time),
    )


def space_pb(
    space: Space,
    *,
    co_hosts: list[str] | None = None,
    counts: Counts | None = None,
    reminder_set: bool = False,
) -> res.Space:
    """The Space resource."""
    message = res.Space(
        name=space_name(space.id),
        id=space.id,
        title=space.title,
        topics=list(space.topics),
        host=user_name(space.host_id),
        co_hosts=[user_name(u) for u in (co_hosts or [])],
        state=int(space.state),  # type: ignore[arg-type]
        visibility=int(space.visibility),  # type: ignore[arg-type]
        speak_permission=int(space.speak_permission),  # type: ignore[arg-type]
        ticketed=space.ticketed,
        recording=space.recording,
        scheduled_start_time=ts(space.scheduled_start_time),
        start_time=ts(space.start_time),
        end_time=ts(space.end_time),
        create_time=ts(space.create_time),
        update_time=ts(space.update_time),
        participant_counts=counts_pb(
            counts if counts is not None and space.state is State.LIVE else Counts()
        ),
        pinned_message=pinned_pb(space.pinned),
        captions_available=space.captions_available,
        recording_state=int(space.recording_state),  # type: ignore[arg-type]
        end_reason=int(space.end_reason),  # type: ignore[arg-type]
        reminder_set=reminder_set and space.state is State.SCHEDULED,
        etag=etag_of(space),
    )
    return message


def invitation_pb(invitation: Invitation) -> res.Invitation:
    """Invitation."""
    return res.Invitation(
        kind=int(invitation.kind),  # type: ignore[arg-type]
        inviter=user_name(invitation.inviter_id),
        create_time=ts(invitation.create_time),
    )


def participant_pb(
    p: Participant, *, private: bool = True, self_view: bool = True
) -> res.Participant:
    """Participant; ``private`` shows hand and invitation (moderators and the participant),
    ``self_view`` shows captions_enabled (the participant only)."""
    return res.Participant(
        name=participant_name(p.space_id, p.user_id),
        user=user_name(p.user_id),
        role=int(p.role),  # type: ignore[arg-type]
        muted=p.muted or not p.role.on_stage,
        hand_raised=p.hand_raised and private,
        hand_raise_time=ts(p.hand_raise_time) if private else None,
        captions_enabled=p.captions_enabled and self_view,
        join_time=ts(p.join_time),
        pending_invitation=invitation_pb(p.invitation) if p.invitation and private else None,
        connected=p.connected,
    )


# --- live events --------------------------------------------------------------------------


def joined_event(p: Participant) -> ev.SpaceEvent:
    """participant_joined."""
    return ev.SpaceEvent(
        participant_joined=ev.SpaceEvent.ParticipantJoined(participant=participant_pb(p))
    )


def left_event(p: Participant) -> ev.SpaceEvent:
    """participant_left."""
    return ev.SpaceEvent(
        participant_left=ev.SpaceEvent.ParticipantLeft(
            participant=participant_name(p.space_id, p.user_id)
        )
    )


def removed_event(p: Participant, by: str, blocked: bool) -> ev.SpaceEvent:
    """participant_removed."""
    return ev.SpaceEvent(
        participant_removed=ev.SpaceEvent.ParticipantRemoved(
            participant=participant_name(p.space_id, p.user_id),
            removed_by=user_name(by),
            blocked_from_space=blocked,
        )
    )


def counts_event(counts: Counts) -> ev.SpaceEvent:
    """participant_counts_changed."""
    return ev.SpaceEvent(
        participant_counts_changed=ev.SpaceEvent.ParticipantCountsChanged(counts=counts_pb(counts))
    )


def hand_raised_event(p: Participant) -> ev.SpaceEvent:
    """hand_raised."""
    return ev.SpaceEvent(hand_raised=ev.SpaceEvent.HandRaised(participant=participant_pb(p)))


def change_events(change: Change, by: str) -> list[ev.SpaceEvent]:
    """The live events announcing a moderation change, in the order they happened."""
    after, before = change.participant, change.before
    name = participant_name(after.space_id, after.user_id)
    events: list[ev.SpaceEvent] = []
    if change.invitation is not None:
        invitation, state = change.invitation
        events.append(
            ev.SpaceEvent(
                invitation_changed=ev.SpaceEvent.InvitationChanged(
                    participant=name,
                    invitation=invitation_pb(invitation),
                    state=int(state),  # type: ignore[arg-type]
                )
            )
        )
    if change.hand_lowered is not None:
        events.append(
            ev.SpaceEvent(
                hand_lowered=ev.SpaceEvent.HandLowered(
                    participant=name,
                    reason=int(change.hand_lowered),  # type: ignore[arg-type]
                )
            )
        )
    if change.role_changed:
        events.append(
            ev.SpaceEvent(
                role_changed=ev.SpaceEvent.RoleChanged(
                    participant=participant_pb(after),
                    old_role=int(before.role),  # type: ignore[arg-type]
                    new_role=int(after.role),  # type: ignore[arg-type]
                    changed_by=user_name(by),
                )
            )
        )
    if change.mute_changed and after.role.on_stage:
        events.append(
            ev.SpaceEvent(
                mute_changed=ev.SpaceEvent.MuteChanged(
                    participant=name, muted=after.muted, changed_by=user_name(by)
                )
            )
        )
    return events


def space_updated_event(space: res.Space) -> ev.SpaceEvent:
    """space_updated."""
    return ev.SpaceEvent(space_updated=ev.SpaceEvent.SpaceUpdated(space=space))


def space_ended_event(space: res.Space) -> ev.SpaceEvent:
    """space_ended."""
    return ev.SpaceEvent(space_ended=ev.SpaceEvent.SpaceEnded(space=space))


def captions_event(p: Participant) -> ev.SpaceEvent:
    """captions_setting_changed (only the participant's own streams show it)."""
    return ev.SpaceEvent(
        captions_setting_changed=ev.SpaceEvent.CaptionsSettingChanged(
            participant=participant_name(p.space_id, p.user_id), enabled=p.captions_enabled
        )
    )


def recording_event(space: Space) -> ev.SpaceEvent:
    """recording_state_changed: the Space's recording state as it is now."""
    return ev.SpaceEvent(
        recording_state_changed=ev.SpaceEvent.RecordingStateChanged(
            state=int(space.recording_state),  # type: ignore[arg-type]
            recording=space.recording_name,
        )
    )


def pinned_event(pinned: Pinned | None) -> ev.SpaceEvent:
    """pinned_message_changed."""
    return ev.SpaceEvent(
        pinned_message_changed=ev.SpaceEvent.PinnedMessageChanged(pinned_message=pinned_pb(pinned))
    )


# --- outbox events --------------------------------------------------------------------------


def started_event(space: Space, *, was_scheduled: bool) -> ev.SpaceStartedEvent:
    """space.started."""
    return ev.SpaceStartedEvent(
        space_id=space.id,
        host_id=space.host_id,
        title=space.title,
        visibility=int(space.visibility),  # type: ignore[arg-type]
        ticketed=space.ticketed,
        recording=space.recording,
        was_scheduled=was_scheduled,
        event_time=ts(space.start_time),
    )


def scheduled_event(space: Space) -> ev.SpaceScheduledEvent:
    """space.scheduled."""
    return ev.SpaceScheduledEvent(
        space_id=space.id,
        host_id=space.host_id,
        title=space.title,
        scheduled_start_time=ts(space.scheduled_start_time),
        visibility=int(space.visibility),  # type: ignore[arg-type]
        ticketed=space.ticketed,
        event_time=ts(space.create_time),
    )


def ended_event(space: Space, unique_participants: int) -> ev.SpaceEndedEvent:
    """space.ended."""
    return ev.SpaceEndedEvent(
        space_id=space.id,
        host_id=space.host_id,
        reason=int(space.end_reason),  # type: ignore[arg-type]
        ticketed=space.ticketed,
        start_time=ts(space.start_time),
        unique_participant_count=unique_participants,
        event_time=ts(space.end_time),
    )


def canceled_event(space: Space) -> ev.SpaceCanceledEvent:
    """space.canceled."""
    return ev.SpaceCanceledEvent(
        space_id=space.id,
        host_id=space.host_id,
        reason=int(space.end_reason),  # type: ignore[arg-type]
        ticketed=space.ticketed,
        scheduled_start_time=ts(space.scheduled_start_time),
        event_time=ts(space.end_time),
    )


def rescheduled_event(
    space: Space, old: datetime | None, now: datetime
) -> ev.SpaceRescheduledEvent:
    """space.rescheduled."""
    return ev.SpaceRescheduledEvent(
        space_id=space.id,
        host_id=space.host_id,
        old_scheduled_start_time=ts(old),
        new_scheduled_start_time=ts(space.scheduled_start_time),
        event_time=ts(now),
    )


def role_value(role: Role) -> int:
    """The proto enum value of a role."""
    return int(role)


__all__ = [
    "EndReason",
    "InvitationState",
    "canceled_event",
    "change_events",
    "counts_event",
    "counts_pb",
    "ended_event",
    "hand_raised_event",
    "joined_event",
    "left_event",
    "participant_name",
    "participant_pb",
    "pinned_event",
    "removed_event",
    "rescheduled_event",
    "scheduled_event",
    "space_ended_event",
    "space_name",
    "space_pb",
    "space_updated_event",
    "started_event",
    "ts",
    "user_name",
]
