"""What each WatchSpace watcher may see: its snapshot and its event filter.

The live package streams events; rooms decides who sees what (SpaceEvent's rules): raised
hands and invitations go to the moderators and the participant concerned, caption segments
to participants with captions on, a media_reconnect only to the participant it moves.

Each stream's filter follows the watcher's own changes as they go by in the Space's order
(a role change, a captions_setting_changed), so turning captions on or off, or becoming a
co-host, takes effect on the stream already open, exactly at that event.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from spaces.rooms.v1 import rooms_events_pb2 as ev

from services.common.auth import Principal
from services.common.grants import MediaGrantVerifier
from services.rooms import convert, domain
from services.rooms.domain import Role, State
from services.rooms.store import SpaceStore

logger = logging.getLogger(__name__)

__all__ = ["Hub", "Watching", "WatcherFilter"]

_PRIVATE = ("hand_raised", "hand_lowered", "invitation_changed")


class Hub(Protocol):
    """The live hub's watch (services.rooms.live.LiveHub.watch_encoded)."""

    def watch_encoded(
        self,
        space_id: str,
        resume_token: str,
        snapshot_provider: Callable[[str, Principal | None], Awaitable[ev.SpaceEvent.Snapshot]],
        *,
        participant_filter: Callable[[ev.SpaceEvent], bool] | None = None,
        principal: Principal | None = None,
    ) -> AsyncIterator[bytes]: ...


class WatcherFilter:
    """One watcher's view; follows its own role changes as the events go by.

    :param space_id: the Space.
    :param user_id: the watcher; None for a service (sees everything).
    :param moderator: the watcher moderates when the stream starts.
    :param captions: the watcher has captions on when the stream starts.
    :param grants: reads the user a media_reconnect's grant is for.
    """

    def __init__(
        self,
        space_id: str,
        user_id: str | None,
        *,
        moderator: bool,
        captions: bool,
        grants: MediaGrantVerifier | None,
    ) -> None:
        self._me = convert.participant_name(space_id, user_id) if user_id else None
        self._user_id = user_id
        self._moderator = moderator
        self._captions = captions
        self._grants = grants
        self.removed = False

    def reset(self, *, moderator: bool, captions: bool) -> None:
        """Start over from what a snapshot read (the events after it update it again)."""
        self._moderator = moderator
        self._captions = captions

    @property
    def captions(self) -> bool:
        """Whether caption segments reach this watcher now."""
        return self._captions

    def __call__(self, event: ev.SpaceEvent) -> bool:
        if self._me is None:
            return True
        kind = event.WhichOneof("event")
        if kind == "role_changed" and event.role_changed.participant.name == self._me:
            role = Role(event.role_changed.new_role)
            self._moderator = role.moderates
        if kind == "captions_setting_changed":
            # The watcher's own setting, in the Space's order: the caption segments after
            # it follow it, on this stream, whichever replica the change was made on.
            if event.captions_setting_changed.participant != self._me:
                return False
            self._captions = event.captions_setting_changed.enabled
            return True
        if kind == "participant_left" and event.participant_left.participant == self._me:
            self._captions = False
        if kind == "participant_removed" and event.participant_removed.participant == self._me:
            # The contract: a removed watcher's stream ends after the response carrying it.
            self.removed = True
        if kind in _PRIVATE:
            payload: Any = getattr(event, kind)
            target = payload.participant
            name = target if isinstance(target, str) else target.name
            return self._moderator or name == self._me
        if kind == "caption_segment":
            return self._captions
        if kind == "media_reconnect":
            return self._reconnect_is_mine(event)
        return True

    def _reconnect_is_mine(self, event: ev.SpaceEvent) -> bool:
        if self._grants is None:
            return False
        try:
            grant = self._grants.verify(event.media_reconnect.media_grant.token, now=0.0)
        except Exception:
            return False
        return grant.user_id == self._user_id


class Watching:
    """Builds snapshots and filters, and hands the stream to the live hub.

    :param store: rooms state.
    :param hub: the live hub.
    :param grants: verifies media grants (to route media_reconnect events).
    """

    def __init__(self, store: SpaceStore, hub: Hub, grants: MediaGrantVerifier | None) -> None:
        self._store = store
        self._hub = hub
        self._grants = grants

    async def snapshot(self, space_id: str, principal: Principal | None) -> ev.SpaceEvent.Snapshot:
        """The Space as the watcher may see it now."""
        snapshot, _, _ = await self._snapshot(space_id, principal)
        return snapshot

    async def _snapshot(
        self, space_id: str, principal: Principal | None
    ) -> tuple[ev.SpaceEvent.Snapshot, bool, bool]:
        """The snapshot, whether the watcher moderates, and whether it has captions on."""
        user_id = principal.user_id if principal is not None and principal.is_user else None
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id)
            if space is None:
                raise domain.space_not_found()
            live = space.state is State.LIVE
            people = await tx.active_participants(space_id) if live else []
            me = await tx.get_participant(space_id, user_id) if user_id else None
            co_hosts = [p.user_id for p in people if p.role is Role.CO_HOST]
            counts = await tx.counts(space_id)
            reminder = bool(user_id) and await tx.get_reminder(space_id, user_id or "") is not None
        actor = domain.actor_of(space, user_id, me) if user_id else domain.Actor.HOST
        moderator = actor in (domain.Actor.HOST, domain.Actor.CO_HOST)
        snapshot = ev.SpaceEvent.Snapshot(
            space=convert.space_pb(space, co_hosts=co_hosts, counts=counts, reminder_set=reminder),
            stage=[
                convert.participant_pb(
                    p, private=moderator or p.user_id == user_id, self_view=p.user_id == user_id
                )
                for p in people
                if p.role.on_stage
            ],
            raised_hands=[
                convert.participant_pb(p, private=True, self_view=p.user_id == user_id)
                for p in sorted(
                    (p for p in people if p.hand_raised and p.role is Role.LISTENER),
                    key=lambda p: p.hand_raise_time or p.join_time,
                )[:100]
            ]
            if moderator
            else [],
        )
        captions = user_id is None or (me is not None and me.active and me.captions_enabled)
        if me is not None and me.active:
            snapshot.caller_participant.CopyFrom(convert.participant_pb(me))
        return snapshot, moderator, captions

    async def watch(
        self, space_id: str, resume_token: str, principal: Principal
    ) -> AsyncIterator[bytes]:
        """The WatchSpace stream for an authorized watcher, as serialized responses."""
        user_id = principal.user_id if principal.is_user else None
        moderator = True
        captions = True
        if user_id is not None:
            async with self._store.transaction() as tx:
                space = await tx.get_space(space_id)
                me = await tx.get_participant(space_id, user_id)
            if space is None:
                raise domain.space_not_found()
            actor = domain.actor_of(space, user_id, me)
            moderator = actor in (domain.Actor.HOST, domain.Actor.CO_HOST)
            captions = me is not None and me.active and me.captions_enabled
        event_filter = WatcherFilter(
            space_id, user_id, moderator=moderator, captions=captions, grants=self._grants
        )

        async def snapshot(space_id: str, principal: Principal | None) -> ev.SpaceEvent.Snapshot:
            # The hub takes the stream's position before asking for the snapshot: the
            # filter starts from what the snapshot read, and every event after that
            # position (a captions or role change included) updates it in order.
            message, moderator, captions = await self._snapshot(space_id, principal)
            event_filter.reset(moderator=moderator, captions=captions)
            return message

        async for response in self._hub.watch_encoded(
            space_id,
            resume_token,
            snapshot,
            participant_filter=event_filter,
            principal=principal,
        ):
            yield response
            if event_filter.removed:
                # The contract: a removed watcher's stream ends after its removal.
                return
