"""The pure rules of Spaces: lifecycle, role transitions, limits, who may do what, visibility."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import ServiceError
from services.rooms import domain
from services.rooms.domain import (
    Actor,
    Counts,
    EndReason,
    HandLoweredReason,
    InvitationKind,
    InvitationState,
    Limits,
    Participant,
    Role,
    Space,
    SpeakPermission,
    State,
    Viewer,
    Visibility,
)

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
LIMITS = Limits(max_co_hosts=2, max_speakers=10)


def space(**changes: object) -> Space:
    base = Space(
        id="s1",
        host_id="h",
        title="Talk",
        topics=(),
        state=State.LIVE,
        visibility=Visibility.EVERYONE,
        speak_permission=SpeakPermission.EVERYONE,
        ticketed=False,
        recording=False,
        create_time=NOW,
        update_time=NOW,
        start_time=NOW,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def person(user: str, role: Role = Role.LISTENER, **changes: object) -> Participant:
    return dataclasses.replace(Participant("s1", user, role, NOW), **changes)  # type: ignore[arg-type]


def reason_of(call: object) -> str:
    with pytest.raises(ServiceError) as caught:
        call()  # type: ignore[operator]
    return caught.value.reason


# --- who may act on whom -------------------------------------------------------------------

# actor        host   co_host speaker listener
MODERATE = {
    Actor.HOST:     (False, True,  True,  True),
    Actor.CO_HOST:  (False, False, True,  True),
    Actor.SPEAKER:  (False, False, False, False),
    Actor.LISTENER: (False, False, False, False),
    Actor.OUTSIDER: (False, False, False, False),
}  # fmt: skip


@pytest.mark.parametrize(
    ("actor", "target", "allowed"),
    [
        (actor, target, allowed)
        for actor, row in MODERATE.items()
        for target, allowed in zip(
            (Role.HOST, Role.CO_HOST, Role.SPEAKER, Role.LISTENER), row, strict=True
        )
    ],
)
def test_may_moderate(actor: Actor, target: Role, allowed: bool) -> None:
    assert domain.may_moderate(actor, target) is allowed


def test_actor_of() -> None:
    s = space()
    assert domain.actor_of(s, "h", None) is Actor.HOST
    assert domain.actor_of(s, "x", None) is Actor.OUTSIDER
    assert domain.actor_of(s, "x", person("x", Role.CO_HOST)) is Actor.CO_HOST
    assert domain.actor_of(s, "x", person("x", Role.CO_HOST, active=False)) is Actor.OUTSIDER


# --- hands ---------------------------------------------------------------------------------


def test_raise_and_approve_hand() -> None:
    s = space()
    raised = domain.request_to_speak(s, person("l"), host_follows_me=False, now=NOW)
    assert raised.hand_raised and raised.revision == 2
    change = domain.approve(s, Actor.CO_HOST, raised, Counts(speaker=3), LIMITS)
    assert change.participant.role is Role.SPEAKER
    assert change.participant.muted and not change.participant.hand_raised
    assert change.hand_lowered is HandLoweredReason.APPROVED
    assert change.media and change.role_changed


def test_approve_refuses_at_the_speaker_limit() -> None:
    hand = person("l", hand_raise_time=NOW)
    assert (
        reason_of(lambda: domain.approve(space(), Actor.HOST, hand, Counts(speaker=10), LIMITS))
        == "SPEAKER_LIMIT_REACHED"
    )


def test_approve_needs_a_raised_hand_and_a_moderator() -> None:
    s = space()
    assert (
        reason_of(lambda: domain.approve(s, Actor.HOST, person("l"), Counts(), LIMITS))
        == "NO_SPEAK_REQUEST"
    )
    hand = person("l", hand_raise_time=NOW)
    assert (
        reason_of(lambda: domain.approve(s, Actor.SPEAKER, hand, Counts(), LIMITS))
        == "NOT_MODERATOR"
    )
    assert (
        reason_of(lambda: domain.approve(s, Actor.HOST, None, Counts(), LIMITS))
        == "PARTICIPANT_NOT_FOUND"
    )
    ended = space(state=State.ENDED)
    assert (
        reason_of(lambda: domain.approve(ended, Actor.HOST, hand, Counts(), LIMITS))
        == "SPACE_NOT_LIVE"
    )


@pytest.mark.parametrize(
    ("permission", "follows", "allowed"),
    [
        (SpeakPermission.EVERYONE, False, True),
        (SpeakPermission.FOLLOWED_BY_HOST, True, True),
        (SpeakPermission.FOLLOWED_BY_HOST, False, False),
        (SpeakPermission.INVITED_ONLY, True, False),
    ],
)
def test_speak_permission(permission: SpeakPermission, follows: bool, allowed: bool) -> None:
    s = space(speak_permission=permission)
    if allowed:
        assert domain.request_to_speak(s, person("l"), host_follows_me=follows, now=NOW).hand_raised
    else:
        assert (
            reason_of(
                lambda: domain.request_to_speak(s, person("l"), host_follows_me=follows, now=NOW)
            )
            == "SPEAK_REQUESTS_RESTRICTED"
        )


def test_request_to_speak_rules() -> None:
    s = space()
    assert (
        reason_of(lambda: domain.request_to_speak(s, None, host_follows_me=False, now=NOW))
        == "NOT_PARTICIPANT"
    )
    speaker = person("x", Role.SPEAKER)
    assert (
        reason_of(lambda: domain.request_to_speak(s, speaker, host_follows_me=False, now=NOW))
        == "NOT_LISTENER"
    )
    raised = person("l", hand_raise_time=NOW)
    assert domain.request_to_speak(s, raised, host_follows_me=False, now=NOW) is raised


def test_permission_change_lowers_hands_it_no_longer_allows() -> None:
    raised = [person("a", hand_raise_time=NOW), person("b", hand_raise_time=NOW)]
    changes = domain.lower_hands_for_permission(SpeakPermission.FOLLOWED_BY_HOST, raised, {"a"})
    assert [c.participant.user_id for c in changes] == ["b"]
    assert changes[0].hand_lowered is HandLoweredReason.SPEAK_PERMISSION_CHANGED


# --- invitations ----------------------------------------------------------------------------


def test_speak_invitation_round_trip() -> None:
    s = space()
    change = domain.invite_to_speak(s, Actor.CO_HOST, "c", person("l"), Counts(), LIMITS, NOW)
    invited = change.participant
    assert invited.invitation is not None and invited.invitation.kind is InvitationKind.SPEAK
    again = domain.invite_to_speak(s, Actor.CO_HOST, "c", invited, Counts(), LIMITS, NOW)
    assert again.participant is invited  # idempotent
    accepted = domain.accept_speak_invitation(s, invited, Counts(), LIMITS)
    assert accepted.participant.role is Role.SPEAKER
    assert accepted.invitation is not None and accepted.invitation[1] is InvitationState.ACCEPTED
    full = domain.accept_speak_invitation
    assert (
        reason_of(lambda: full(s, invited, Counts(speaker=10), LIMITS)) == "SPEAKER_LIMIT_REACHED"
    )
    declined = domain.decline_invitation(invited, InvitationKind.SPEAK)
    assert declined.participant.invitation is None


def test_co_host_invitation_only_from_the_host() -> None:
    s = space()
    listener = person("l")
    assert (
        reason_of(lambda: domain.add_co_host(s, "c", listener, "l", Counts(), LIMITS, NOW))
        == "NOT_HOST"
    )
    assert (
        reason_of(
            lambda: domain.add_co_host(s, "h", person("h", Role.HOST), "h", Counts(), LIMITS, NOW)
        )
        == "TARGET_IS_CALLER"
    )
    assert (
        reason_of(
            lambda: domain.add_co_host(
                s, "h", person("c", Role.CO_HOST), "c", Counts(), LIMITS, NOW
            )
        )
        == "ALREADY_CO_HOST"
    )
    assert (
        reason_of(lambda: domain.add_co_host(s, "h", listener, "l", Counts(co_host=2), LIMITS, NOW))
        == "CO_HOST_LIMIT_REACHED"
    )
    invited = domain.add_co_host(s, "h", listener, "l", Counts(), LIMITS, NOW).participant
    assert (
        reason_of(
            lambda: domain.accept_co_host_invitation(s, invited, Counts(co_host=2), LIMITS, NOW)
        )
        == "CO_HOST_LIMIT_REACHED"
    )
    assert (
        domain.accept_co_host_invitation(s, invited, Counts(), LIMITS, NOW).participant.role
        is Role.CO_HOST
    )


@pytest.mark.parametrize(("speakers", "after"), [(3, Role.SPEAKER), (10, Role.LISTENER)])
def test_removed_co_host_stays_on_stage_if_there_is_room(speakers: int, after: Role) -> None:
    co_host = person("c", Role.CO_HOST, muted=False)
    change = domain.remove_co_host(space(), "h", co_host, Counts(speaker=speakers), LIMITS)
    assert change.participant.role is after


def test_co_host_steps_down_but_cannot_remove_another() -> None:
    s = space()
    c = person("c", Role.CO_HOST)
    assert domain.remove_co_host(s, "c", c, Counts(), LIMITS).participant.role is Role.SPEAKER
    assert reason_of(lambda: domain.remove_co_host(s, "d", c, Counts(), LIMITS)) == "NOT_HOST"


def test_speaker_steps_down_and_moderators_revoke() -> None:
    s = space()
    speaker = person("s", Role.SPEAKER)
    assert domain.revoke_speaker(s, Actor.SPEAKER, "s", speaker).participant.role is Role.LISTENER
    assert (
        reason_of(lambda: domain.revoke_speaker(s, Actor.SPEAKER, "x", speaker)) == "NOT_MODERATOR"
    )
    assert (
        reason_of(lambda: domain.revoke_speaker(s, Actor.HOST, "h", person("l"))) == "NOT_SPEAKER"
    )


# --- microphones and removal ----------------------------------------------------------------


def test_only_the_participant_unmutes() -> None:
    s = space()
    speaker = person("s", Role.SPEAKER)
    unmuted = domain.set_own_mute(s, speaker, False).participant
    assert not unmuted.muted
    muted = domain.mute(s, Actor.CO_HOST, unmuted).participant
    assert muted.muted
    assert reason_of(lambda: domain.set_own_mute(s, person("l"), False)) == "NOT_ON_STAGE"
    assert reason_of(lambda: domain.mute(s, Actor.HOST, person("l"))) == "NOT_ON_STAGE"
    assert (
        reason_of(lambda: domain.mute(s, Actor.CO_HOST, person("h", Role.HOST)))
        == "CANNOT_MODERATE_TARGET"
    )


def test_remove() -> None:
    s = space()
    removed = domain.remove(s, Actor.HOST, "h", person("c", Role.CO_HOST), "c")
    assert not removed.active and removed.role is Role.LISTENER
    assert (
        reason_of(lambda: domain.remove(s, Actor.HOST, "h", person("h", Role.HOST), "h"))
        == "TARGET_IS_CALLER"
    )
    assert (
        reason_of(lambda: domain.remove(s, Actor.CO_HOST, "c", person("d", Role.CO_HOST), "d"))
        == "CANNOT_MODERATE_TARGET"
    )


def test_rejoin_keeps_revision_increasing() -> None:
    s = space()
    first = domain.join(s, "l", None, Counts(), LIMITS, NOW)
    left = domain.leave(first)
    back = domain.join(s, "l", left, Counts(), LIMITS, NOW)
    assert first.revision < left.revision < back.revision
    assert back.active and back.role is Role.LISTENER
    assert domain.join(s, "l", back, Counts(), LIMITS, NOW) is back
    assert reason_of(lambda: domain.leave(person("h", Role.HOST))) == "HOST_CANNOT_LEAVE"
    full = Limits(max_participants=2)
    assert (
        reason_of(lambda: domain.join(s, "x", None, Counts(host=1, listener=1), full, NOW))
        == "SPACE_FULL"
    )


# --- lifecycle ------------------------------------------------------------------------------


def test_schedule_bounds() -> None:
    ahead = timedelta(days=14)
    domain.check_schedule(NOW + timedelta(days=13), NOW, ahead)
    assert reason_of(lambda: domain.check_schedule(NOW, NOW, ahead)) == "SCHEDULE_IN_PAST"
    assert (
        reason_of(lambda: domain.check_schedule(NOW + timedelta(days=15), NOW, ahead))
        == "SCHEDULE_TOO_FAR_AHEAD"
    )


def test_state_machine() -> None:
    scheduled = space(state=State.SCHEDULED, start_time=None)
    assert reason_of(lambda: domain.start(scheduled, "x", NOW)) == "NOT_HOST"
    live = domain.start(scheduled, "h", NOW)
    assert live is not None and live.state is State.LIVE
    assert domain.start(live, "h", NOW) is None
    assert (
        reason_of(lambda: domain.cancel(live, "h", NOW, EndReason.HOST_CANCELED))
        == "SPACE_NOT_SCHEDULED"
    )
    ended = domain.end(live, "h", NOW, EndReason.HOST_ENDED)
    assert ended is not None and ended.state is State.ENDED
    assert domain.end(ended, "h", NOW, EndReason.HOST_ENDED) is None
    assert reason_of(lambda: domain.start(ended, "h", NOW)) == "SPACE_NOT_SCHEDULED"
    assert (
        reason_of(lambda: domain.end(scheduled, "h", NOW, EndReason.HOST_ENDED)) == "SPACE_NOT_LIVE"
    )
    canceled = domain.cancel(scheduled, None, NOW, EndReason.NOT_STARTED)
    assert canceled is not None and canceled.end_reason is EndReason.NOT_STARTED


def test_update_checks_etag_and_state() -> None:
    s = space(state=State.SCHEDULED, scheduled_start_time=NOW + timedelta(days=1))
    change = domain.SpaceUpdate(title="New")
    after = domain.update(
        s, "h", change, etag=domain.etag_of(s), now=NOW, max_ahead=timedelta(days=14)
    )
    assert after.title == "New" and domain.etag_of(after) != domain.etag_of(s)
    assert (
        reason_of(
            lambda: domain.update(
                after, "h", change, etag=domain.etag_of(s), now=NOW, max_ahead=timedelta(days=14)
            )
        )
        == "ETAG_MISMATCH"
    )
    live = space()
    move = domain.SpaceUpdate(scheduled_start_time=NOW + timedelta(hours=1))
    assert (
        reason_of(
            lambda: domain.update(live, "h", move, etag="", now=NOW, max_ahead=timedelta(days=14))
        )
        == "SPACE_NOT_SCHEDULED"
    )
    assert (
        reason_of(
            lambda: domain.update(live, "x", change, etag="", now=NOW, max_ahead=timedelta(days=14))
        )
        == "NOT_HOST"
    )


# --- visibility -----------------------------------------------------------------------------

# visibility               stranger follows invited  link   participant blocked+invited
SEE = {
    Visibility.EVERYONE:          (True,  True,  True,  True,  True,  False),
    Visibility.FOLLOWED_BY_HOST:  (False, True,  True,  True,  True,  False),
    Visibility.INVITED_ONLY:      (False, False, True,  True,  True,  False),
}  # fmt: skip
VIEWERS = (
    Viewer("v"),
    Viewer("v", host_follows=True),
    Viewer("v", invited=True),
    Viewer("v", has_link=True),
    Viewer("v", participant=True),
    Viewer("v", blocked=True, invited=True),
)


@pytest.mark.parametrize(
    ("visibility", "viewer", "visible"),
    [
        (v, viewer, seen)
        for v, row in SEE.items()
        for viewer, seen in zip(VIEWERS, row, strict=True)
    ],
)
def test_may_see(visibility: Visibility, viewer: Viewer, visible: bool) -> None:
    assert domain.may_see(space(visibility=visibility), viewer) is visible


def test_host_always_sees() -> None:
    assert domain.may_see(space(visibility=Visibility.INVITED_ONLY), Viewer("h", blocked=True))


def test_counts_with() -> None:
    before = person("l")
    after = person("l", Role.SPEAKER)
    assert domain.counts_with(Counts(host=1, listener=3), before, after) == Counts(1, 0, 1, 2)
