"""Which live events each watcher sees."""

from __future__ import annotations

from spaces.rooms.v1 import rooms_events_pb2 as ev
from spaces.rooms.v1 import rooms_resources_pb2 as res

from services.common.grants import MediaGrantSigner, MediaGrantVerifier
from services.rooms.watching import WatcherFilter

SECRET = "g" * 40
ME = "spaces/s1/participants/me1"
OTHER = "spaces/s1/participants/other"


def hand(name: str) -> ev.SpaceEvent:
    return ev.SpaceEvent(
        hand_raised=ev.SpaceEvent.HandRaised(participant=res.Participant(name=name))
    )


def watcher(*, moderator: bool = False, captions: bool = False) -> WatcherFilter:
    return WatcherFilter(
        "s1", "me1", moderator=moderator, captions=captions, grants=MediaGrantVerifier(SECRET)
    )


def test_private_events_go_to_moderators_and_the_participant() -> None:
    listener = watcher()
    assert listener(hand(ME))
    assert not listener(hand(OTHER))
    assert watcher(moderator=True)(hand(OTHER))
    lowered = ev.SpaceEvent(hand_lowered=ev.SpaceEvent.HandLowered(participant=OTHER))
    assert not listener(lowered)
    assert listener(
        ev.SpaceEvent(participant_left=ev.SpaceEvent.ParticipantLeft(participant=OTHER))
    )


def test_a_watcher_who_becomes_co_host_starts_seeing_hands() -> None:
    me = watcher()
    promoted = ev.SpaceEvent(
        role_changed=ev.SpaceEvent.RoleChanged(
            participant=res.Participant(name=ME, role=res.PARTICIPANT_ROLE_CO_HOST),
            new_role=res.PARTICIPANT_ROLE_CO_HOST,
        )
    )
    assert me(promoted)
    assert me(hand(OTHER))


def test_captions_only_with_captions_on() -> None:
    segment = ev.SpaceEvent(caption_segment=res.CaptionSegment(text="hi"))
    assert not watcher()(segment)
    assert watcher(captions=True)(segment)


def test_media_reconnect_only_to_its_participant() -> None:
    token, _ = MediaGrantSigner(SECRET).sign(
        space_id="s1", user_id="me1", role="listener", may_publish=False, node="media-2"
    )
    event = ev.SpaceEvent(
        media_reconnect=ev.SpaceEvent.MediaReconnect(media_grant=res.MediaGrant(token=token))
    )
    assert watcher()(event)
    other = WatcherFilter(
        "s1", "other", moderator=True, captions=True, grants=MediaGrantVerifier(SECRET)
    )
    assert not other(event)


def test_services_see_everything() -> None:
    service = WatcherFilter("s1", None, moderator=False, captions=False, grants=None)
    assert service(hand(OTHER))


def captions(name: str, enabled: bool) -> ev.SpaceEvent:
    return ev.SpaceEvent(
        captions_setting_changed=ev.SpaceEvent.CaptionsSettingChanged(
            participant=name, enabled=enabled
        )
    )


def test_captions_toggle_applies_from_that_event_on() -> None:
    segment = ev.SpaceEvent(caption_segment=res.CaptionSegment(text="hi"))
    me = watcher()
    assert not me(segment)
    assert me(captions(ME, True))
    assert me(segment)
    assert me(captions(ME, False))
    assert not me(segment)


def test_someone_elses_captions_setting_is_private_and_changes_nothing() -> None:
    segment = ev.SpaceEvent(caption_segment=res.CaptionSegment(text="hi"))
    me = watcher(moderator=True)
    assert not me(captions(OTHER, True))
    assert not me(segment)


def test_leaving_turns_captions_off_and_reset_starts_over() -> None:
    segment = ev.SpaceEvent(caption_segment=res.CaptionSegment(text="hi"))
    me = watcher(captions=True)
    me(ev.SpaceEvent(participant_left=ev.SpaceEvent.ParticipantLeft(participant=ME)))
    assert not me(segment)
    me.reset(moderator=False, captions=True)
    assert me(segment)
    assert not me(hand(OTHER))
