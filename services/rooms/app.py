"""Rooms' use cases: each reads what the rules need, lets :mod:`~services.rooms.domain`
decide, and commits the change with its live and outbox events in one transaction.

Calls to other services happen before the transaction (visibility, tickets) or after it
(media permissions), never while a Space's row is locked, except placement and opening
media where the answer must be part of what commits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import redis.asyncio
from google.protobuf.message import Message
from psycopg.errors import UniqueViolation
from spaces.identity.v1 import identity_events_pb2
from spaces.rooms.v1 import rooms_events_pb2 as ev
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb

from services.common import outbox
from services.common.admission import Admission
from services.common.auth import Principal
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from services.common.events import StreamEvent
from services.common.grants import MediaGrantSigner
from services.common.ids import new_id
from services.rooms import convert, domain
from services.rooms.blocks import BlockCache
from services.rooms.clients import Identity, Media, MediaSpaceNotOpen, Payments, Placement
from services.rooms.domain import (
    Actor,
    Change,
    Counts,
    EndReason,
    InvitationKind,
    Limits,
    Participant,
    Pinned,
    Role,
    Space,
    SpeakPermission,
    State,
    Viewer,
    Visibility,
)
from services.rooms.settings import RoomsSettings
from services.rooms.store import RoomsTx, SpaceStore
from services.rooms.tokens import JoinLinks, PageTokens, time_key

logger = logging.getLogger(__name__)

__all__ = ["EventLog", "LiveWatch", "Rooms"]

FEED_TOKEN_TTL = timedelta(minutes=10)
FEED_MAX_FOLLOWING = 5000
FEED_MAX_CANDIDATES = 500
SPEAKING_CONTEXT_TTL_S = 30
# participant_counts_changed goes out at most this often per Space (SpaceEvent says 1/s).
COUNTS_INTERVAL_MS = 1000


class EventLog(Protocol):
    """The live event log (services.rooms.live.SpaceEventLog)."""

    async def append(self, conn: Any, space_id: str, event: ev.SpaceEvent) -> int: ...

    async def add_reaction(
        self, space_id: str, user_id: str, emoji: res.Emoji.ValueType
    ) -> None: ...

    async def add_speaking_levels(
        self, space_id: str, levels: Sequence[res.SpeakingLevel]
    ) -> None: ...


class LiveWatch(Protocol):
    """Streams a Space's live events to one watcher (services.rooms.live)."""

    def watch(self, space_id: str, resume_token: str, principal: Principal) -> AsyncIterator[bytes]:
        """Serialized WatchSpaceResponse messages (see services.rooms.api.add_to_server)."""
        ...


def utcnow() -> datetime:
    """Now, in UTC (microsecond precision, as PostgreSQL keeps it)."""
    return datetime.now(UTC)


def fingerprint(request: Message) -> bytes:
    """A digest of a request without its idempotency key."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


def key_reused() -> FailedPrecondition:
    """Same idempotency key, different request."""
    return FailedPrecondition(
        "request_id was used before with a different request", reason="IDEMPOTENCY_KEY_REUSED"
    )


@dataclass(frozen=True)
class Seen:
    """A Space the caller may see, with what was read to decide it."""

    space: Space
    me: Participant | None
    invited: bool


class Rooms:
    """The rooms use cases.

    :param store: durable state.
    :param events: the live event log.
    :param identity: identity client.
    :param payments: payments client.
    :param media: media client.
    :param grants: signs media grants.
    :param redis: presence and rate limits.
    :param settings: rooms settings.
    :param link_key: key of join links and page tokens.
    :param blocks: identity's block answers, cached (none by default: identity is asked).
    """

    def __init__(
        self,
        *,
        store: SpaceStore,
        events: EventLog,
        identity: Identity,
        payments: Payments,
        media: Media,
        grants: MediaGrantSigner,
        redis: redis.asyncio.Redis,
        settings: RoomsSettings,
        link_key: bytes,
        blocks: BlockCache | None = None,
    ) -> None:
        self._store = store
        self._blocks = blocks or BlockCache(identity, None, ttl_s=0, max_size=1)
        self._events = events
        self._identity = identity
        self._payments = payments
        self._media = media
        self._grants = grants
        self._redis = redis
        self._settings = settings
        self._joins = Admission(
            settings.max_concurrent_joins,
            reason="JOINS_BUSY",
            subject="rooms replica",
            what="joins",
        )
        self._limits = Limits(
            settings.max_co_hosts, settings.max_speakers, settings.max_participants
        )
        self._links = JoinLinks(link_key, settings.join_link_base_uri)
        self._pages = PageTokens(link_key)
        self._background: set[asyncio.Task[None]] = set()
        self._trailing_counts: set[str] = set()

    # --- helpers ----------------------------------------------------------------------------

    async def _space_pb(self, tx: RoomsTx, space: Space, viewer_id: str | None) -> res.Space:
        co_hosts = await tx.co_host_ids(space.id) if space.state is State.LIVE else []
        counts = await tx.counts(space.id) if space.state is State.LIVE else Counts()
        reminder = (
            viewer_id is not None
            and space.state is State.SCHEDULED
            and await tx.get_reminder(space.id, viewer_id) is not None
        )
        return convert.space_pb(space, co_hosts=co_hosts, counts=counts, reminder_set=reminder)

    async def _append(self, tx: RoomsTx, space_id: str, events: Sequence[ev.SpaceEvent]) -> None:
        for event in events:
            await self._events.append(tx.conn, space_id, event)

    async def _announce_presence(self, tx: RoomsTx, p: Participant, event: ev.SpaceEvent) -> None:
        """participant_joined or participant_left, as SpaceEvent promises: always for people
        on stage, for listeners only while the Space is small (a big Space's watchers get
        the coalesced participant_counts_changed instead of one event per listener)."""
        if p.role is Role.LISTENER:
            small = self._settings.listener_events_max
            if await tx.active_count(p.space_id, small + 1) > small:
                return
        await self._append(tx, p.space_id, [event])

    @staticmethod
    def _recording_events(space: Space) -> list[ev.SpaceEvent]:
        """recording_state_changed when a recorded Space goes live or ends (everyone sees it)."""
        return [convert.recording_event(space)] if space.recording else []

    async def _host_follows(self, space: Space, user_id: str) -> bool:
        return await self._identity.follows(space.host_id, user_id)

    async def seen(self, space_id: str, user_id: str | None, link_token: str = "") -> Seen:
        """The Space if ``user_id`` may see it (service callers see everything).

        :raises NotFound: SPACE_NOT_FOUND when it does not exist or is hidden.
        """
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id)
            if space is None:
                raise domain.space_not_found()
            if user_id is None:
                return Seen(space, None, False)
            me = await tx.get_participant(space_id, user_id)
            invited = await tx.is_invited(space_id, user_id)
        if user_id == space.host_id:
            return Seen(space, me, invited)
        blocked = await self._blocks.blocked(space.host_id, user_id)
        viewer = Viewer(
            user_id=user_id,
            blocked=blocked,
            invited=invited,
            participant=me is not None and me.active,
        )
        if domain.may_see(space, viewer):
            return Seen(space, me, invited)
        if blocked:
            raise domain.space_not_found()
        if domain.needs_follow_check(space, user_id):
            if await self._host_follows(space, user_id):
                return Seen(space, me, invited)
        if link_token:
            # Consulted only when the Space is otherwise hidden: a bad link then matters.
            self._links.check(link_token, space.id, utcnow())
            if space.is_over:
                # "The link stops working when it expires or the Space ends"
                # (CreateJoinLink): past the end it is as stale as an expired one, and tells
                # its holder no more than that (they knew of the Space already).
                raise FailedPrecondition("the join link expired", reason="JOIN_LINK_EXPIRED")
            return Seen(space, me, invited)
        raise domain.space_not_found()

    async def _push_media(self, p: Participant, *, removed: bool = False) -> None:
        """Tell media the participant's permissions now (within the caller's RPC)."""
        try:
            await self._media.update_permissions(
                p.space_id,
                p.user_id,
                may_publish=p.active and p.role.on_stage,
                muted=p.muted or not p.role.on_stage,
                removed=removed,
                revision=p.revision,
            )
        except Exception:
            # Rooms' state is committed; media must converge. Retry in the background so
            # the caller is not held, with the same revision (media drops stale ones).
            logger.warning("UpdatePermissions failed; retrying in the background", exc_info=True)
            self._spawn(self._retry_media(p, removed))

    async def _retry_media(self, p: Participant, removed: bool) -> None:
        for delay in (0.1, 0.5, 1.0, 2.0, 5.0):
            await asyncio.sleep(delay)
            try:
                await self._media.update_permissions(
                    p.space_id,
                    p.user_id,
                    may_publish=p.active and p.role.on_stage,
                    muted=p.muted or not p.role.on_stage,
                    removed=removed,
                    revision=p.revision,
                )
                return
            except Exception:
                logger.warning("UpdatePermissions retry failed", exc_info=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _place(self, space: Space, user_id: str, may_publish: bool, avoid: str) -> Placement:
        """Place a participant, opening the Space on media again if media lost it."""
        try:
            return await self._media.place(space.id, user_id, may_publish, avoid)
        except MediaSpaceNotOpen:
            logger.warning("media does not serve live space %s; opening it again", space.id)
            await self._media.open_space(space.id, space.recording)
            return await self._media.place(space.id, user_id, may_publish, avoid)

    async def _move_to_origin(self, space_id: str, p: Participant) -> None:
        """Someone who came on stage while on an edge node must reconnect to the origin."""
        node = p.media_session.split("/")[1] if p.media_session.startswith("mediaNodes/") else ""
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id)
        if space is None or not node or node == space.origin_node:
            return
        try:
            await self._reconnect(space, p, int(ev.MEDIA_RECONNECT_REASON_ROLE_CHANGED), avoid="")
        except Exception:
            logger.warning("could not move %s to the origin node", p.user_id, exc_info=True)

    async def _reconnect(self, space: Space, p: Participant, reason: int, *, avoid: str) -> None:
        """Place ``p`` again and send them a media_reconnect event with a fresh grant."""
        placement = await self._place(space, p.user_id, p.role.on_stage, avoid)
        token, grant = self._grants.sign(
            space_id=space.id,
            user_id=p.user_id,
            role=p.role.grant_name,
            may_publish=p.role.on_stage,
            node=placement.node,
        )
        event = ev.SpaceEvent(
            media_reconnect=ev.SpaceEvent.MediaReconnect(
                media_grant=res.MediaGrant(
                    token=token,
                    expire_time=convert.ts(grant.expire_time),
                    endpoint=res.MediaEndpoint(
                        node=placement.node,
                        uri=placement.endpoint or self._settings.media_public_uri,
                    ),
                    may_publish=grant.may_publish,
                ),
                reason=reason,  # type: ignore[arg-type]
            )
        )
        async with self._store.transaction() as tx:
            await self._events.append(tx.conn, space.id, event)

    async def _counts_changed(self, space_id: str) -> None:
        """Announce participant counts, at most once a second per Space across replicas.

        The first change in a window is announced at once; later ones are covered by one
        trailing announcement when the window ends. Counts are read after the change
        committed, so whichever announcement comes last carries them.
        """
        key = f"rooms:counts:{space_id}"
        if await self._redis.set(key, b"1", nx=True, px=COUNTS_INTERVAL_MS):
            await self._announce_counts(space_id)
        elif space_id not in self._trailing_counts:
            self._trailing_counts.add(space_id)
            self._spawn(self._announce_counts_later(space_id, key))

    async def _announce_counts_later(self, space_id: str, key: str) -> None:
        try:
            wait_ms = await self._redis.pttl(key)
            await asyncio.sleep(max(int(wait_ms), 0) / 1000 + 0.005)
            # Set by someone else meanwhile: they read the counts after our change.
            if await self._redis.set(key, b"1", nx=True, px=COUNTS_INTERVAL_MS):
                await self._announce_counts(space_id)
        except Exception:
            logger.warning("announcing counts of %s failed", space_id, exc_info=True)
        finally:
            self._trailing_counts.discard(space_id)

    async def _announce_counts(self, space_id: str) -> None:
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id)
            if space is None or space.state is not State.LIVE:
                return
            counts = await tx.counts(space_id)
            await self._append(tx, space_id, [convert.counts_event(counts)])

    async def _close_media(self, space_id: str) -> None:
        try:
            await self._media.close_space(space_id)
        except Exception:
            logger.warning("CloseSpace failed for %s; retrying later", space_id, exc_info=True)
            self._spawn(self._retry_close(space_id))

    async def _retry_close(self, space_id: str) -> None:
        for delay in (0.5, 2.0, 5.0, 15.0):
            await asyncio.sleep(delay)
            try:
                await self._media.close_space(space_id)
                return
            except Exception:
                logger.warning("CloseSpace retry failed", exc_info=True)

    async def aclose(self) -> None:
        """Wait briefly for background media retries, then cancel them."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- lifecycle --------------------------------------------------------------------------

    async def create_space(
        self, caller: str, request: pb.CreateSpaceRequest
    ) -> pb.CreateSpaceResponse:
        """CreateSpace."""
        given = request.space
        now = utcnow()
        domain.check_title(given.title)
        scheduled = (
            given.scheduled_start_time.ToDatetime(tzinfo=UTC)
            if given.HasField("scheduled_start_time")
            else None
        )
        digest = fingerprint(request)
        async with self._store.transaction() as tx:
            first = await tx.lookup_idempotency(caller, "CreateSpace", request.request_id)
        if first is not None:
            # A retry: answer before any check, so it gets the first response even if the
            # world changed since (the host went live meanwhile, say).
            if first.fingerprint != digest:
                raise key_reused()
            if first.response is not None:
                return pb.CreateSpaceResponse.FromString(first.response)
        if scheduled is not None:
            domain.check_schedule(scheduled, now, self._settings.max_schedule_ahead)
        eligibility = await self._identity.host_eligibility(caller)
        if not eligibility.eligible:
            raise PermissionDenied(
                "the host policy does not let you host yet",
                reason="HOST_NOT_ELIGIBLE",
                metadata={
                    "min_followers": str(eligibility.min_followers),
                    "follower_count": str(eligibility.follower_count),
                },
            )
        space = Space(
            id=new_id(),
            host_id=caller,
            title=given.title,
            topics=tuple(given.topics),
            state=State.SCHEDULED,
            visibility=Visibility(given.visibility or Visibility.EVERYONE),
            speak_permission=SpeakPermission(given.speak_permission or SpeakPermission.EVERYONE),
            ticketed=given.ticketed,
            recording=given.recording,
            create_time=now,
            update_time=now,
            scheduled_start_time=scheduled,
        )
        opened = False
        try:
            async with self._store.transaction() as tx:
                claim = await tx.claim_idempotency(
                    caller, "CreateSpace", request.request_id, digest
                )
                if not claim.new:
                    if claim.fingerprint != digest or claim.response is None:
                        raise key_reused()
                    return pb.CreateSpaceResponse.FromString(claim.response)
                if scheduled is None:
                    live = await tx.live_space_of_host(caller)
                    if live is not None:
                        raise domain.host_already_live(live)
                    media = await self._media.open_space(space.id, space.recording)
                    opened = True
                    space = dataclasses.replace(
                        domain.go_live(space, now),
                        origin_node=media.origin,
                        recording_name=media.recording,
                        version=1,
                    )
                else:
                    domain.check_scheduled_limit(
                        await tx.count_scheduled(caller), self._settings.max_scheduled_spaces
                    )
                if not await tx.insert_space(space):
                    live = await tx.live_space_of_host(caller)
                    raise domain.host_already_live(live or "")
                if space.state is State.LIVE:
                    host = Participant(space.id, caller, Role.HOST, now, role_time=now)
                    await tx.save_participant(host)
                    await self._append(
                        tx,
                        space.id,
                        [
                            convert.joined_event(host),
                            convert.counts_event(Counts(host=1)),
                            *self._recording_events(space),
                        ],
                    )
                    await outbox.append(
                        tx.conn,
                        "space.started",
                        convert.space_name(space.id),
                        convert.started_event(space, was_scheduled=False),
                    )
                else:
                    await outbox.append(
                        tx.conn,
                        "space.scheduled",
                        convert.space_name(space.id),
                        convert.scheduled_event(space),
                    )
                response = pb.CreateSpaceResponse(space=await self._space_pb(tx, space, caller))
                await tx.complete_idempotency(
                    caller, "CreateSpace", request.request_id, response.SerializeToString()
                )
        except BaseException:
            if opened:
                self._spawn(self._close_media(space.id))
            raise
        logger.info("space %s created (%s) by %s", space.id, space.state.name, caller)
        return response

    async def get_space(self, caller: str | None, space_id: str, link: str) -> res.Space:
        """GetSpace."""
        seen = await self.seen(space_id, caller, link)
        async with self._store.transaction() as tx:
            return await self._space_pb(tx, seen.space, caller)

    async def list_spaces(
        self,
        caller: str | None,
        host_id: str | None,
        states: Sequence[State],
        size: int,
        token: str,
    ) -> pb.ListSpacesResponse:
        """ListSpaces: pages of visible Spaces (hidden ones are skipped, not counted).

        Keyset paging: the token names the last Space the page went through (signed, bound
        to the query), and the next page starts strictly after it in ListSpaces order, so
        Spaces created or ended meanwhile never make the others repeat or go missing (a
        Space whose state changes moves to its new place in the order, like any list).
        """
        states = list(states) or [State.LIVE, State.SCHEDULED]
        query = f"{caller}|{host_id}|{sorted(int(s) for s in states)}"
        now = utcnow()
        cursor = self._pages.after(token, query, now, None)
        size = size or 20
        batch_size = size * 2
        result: list[res.Space] = []
        exhausted = False
        while len(result) < size and not exhausted:
            async with self._store.transaction() as tx:
                batch = await tx.list_spaces(
                    host_id=host_id, states=states, after=cursor, limit=batch_size
                )
            visible = await self._filter_visible([space for space, _ in batch], caller)
            taken = 0
            async with self._store.transaction() as tx:
                for space, key in batch:
                    taken += 1
                    cursor = key
                    if space.id in visible:
                        result.append(await self._space_pb(tx, space, caller))
                        if len(result) == size:
                            break
            exhausted = len(batch) < batch_size and taken == len(batch)
        more = not exhausted and cursor is not None
        next_token = self._pages.issue_after(query, cursor, now) if more and cursor else ""
        return pb.ListSpacesResponse(spaces=result, next_page_token=next_token)

    async def _filter_visible(self, spaces: Sequence[Space], caller: str | None) -> set[str]:
        """Ids of the Spaces ``caller`` may see, with one block check for all hosts."""
        if caller is None:
            return {s.id for s in spaces}
        hosts = [s.host_id for s in spaces if s.host_id != caller]
        blocked = await self._identity.blocked_between(caller, hosts) if hosts else set()
        visible: set[str] = set()
        follows: dict[str, bool] = {}
        async with self._store.transaction() as tx:
            invited_to, present_in = await tx.memberships(caller, [s.id for s in spaces])
        for space in spaces:
            if space.host_id != caller and space.host_id in blocked:
                continue
            viewer = Viewer(
                caller, invited=space.id in invited_to, participant=space.id in present_in
            )
            if domain.may_see(space, viewer):
                visible.add(space.id)
            elif domain.needs_follow_check(space, caller):
                if space.host_id not in follows:
                    follows[space.host_id] = await self._identity.follows(space.host_id, caller)
                if follows[space.host_id]:
                    visible.add(space.id)
        return visible

    async def update_space(
        self, caller: str, space_id: str, change: domain.SpaceUpdate, etag: str
    ) -> res.Space:
        """UpdateSpace."""
        await self.seen(space_id, caller)
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            after = domain.update(
                space,
                caller,
                change,
                etag=etag,
                now=now,
                max_ahead=self._settings.max_schedule_ahead,
            )
            await tx.save_space(after)
            message = await self._space_pb(tx, after, caller)
            await self._append(tx, space_id, [convert.space_updated_event(message)])
            if (
                change.scheduled_start_time is not None
                and change.scheduled_start_time != space.scheduled_start_time
            ):
                await outbox.append(
                    tx.conn,
                    "space.rescheduled",
                    convert.space_name(space_id),
                    convert.rescheduled_event(after, space.scheduled_start_time, now),
                )
            if change.speak_permission is not None and after.state is State.LIVE:
                await self._lower_hands(tx, after)
        return message

    async def start_space(self, caller: str, space_id: str) -> res.Space:
        """StartSpace."""
        seen = await self.seen(space_id, caller)
        if seen.space.host_id != caller:
            raise domain.not_host()
        if seen.space.state is State.LIVE:
            async with self._store.transaction() as tx:
                return await self._space_pb(tx, seen.space, caller)
        if seen.space.state is not State.SCHEDULED:
            raise FailedPrecondition("the Space is over", reason="SPACE_NOT_SCHEDULED")
        async with self._store.transaction() as tx:
            live = await tx.live_space_of_host(caller)
            if live is not None and live != space_id:
                raise domain.host_already_live(live)
        media = await self._media.open_space(space_id, seen.space.recording)
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            after = domain.start(space, caller, now)
            if after is None:
                return await self._space_pb(tx, space, caller)
            after = dataclasses.replace(
                after, origin_node=media.origin, recording_name=media.recording
            )
            live = await tx.live_space_of_host(caller)
            if live is not None:
                raise domain.host_already_live(live)
            try:
                await tx.save_space(after)
            except UniqueViolation:
                # Another replica put the host live between the check and the write.
                raise domain.host_already_live("") from None
            await tx.set_host_absent(space_id, now)
            existing = await tx.get_participant(space_id, caller)
            host = domain.join(after, caller, existing, Counts(), self._limits, now)
            await tx.save_participant(host)
            message = await self._space_pb(tx, after, caller)
            await self._append(
                tx,
                space_id,
                [
                    convert.space_updated_event(message),
                    convert.joined_event(host),
                    convert.counts_event(Counts(host=1)),
                    *self._recording_events(after),
                ],
            )
            await outbox.append(
                tx.conn,
                "space.started",
                convert.space_name(space_id),
                convert.started_event(after, was_scheduled=True),
            )
        return message

    async def end_space(
        self, caller: str | None, space_id: str, reason: EndReason = EndReason.HOST_ENDED
    ) -> res.Space:
        """EndSpace (``caller`` None: rooms ends it itself)."""
        if caller is not None:
            await self.seen(space_id, caller)
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            after = domain.end(space, caller, now, reason)
            if after is None:
                return await self._space_pb(tx, space, caller)
            message = await self._finish(tx, after)
        await self._close_media(space_id)
        logger.info("space %s ended (%s)", space_id, reason.name)
        return message

    async def _finish(self, tx: RoomsTx, after: Space) -> res.Space:
        await tx.save_space(after)
        await tx.deactivate_all(after.id)
        message = await self._space_pb(tx, after, None)
        await self._append(
            tx, after.id, [*self._recording_events(after), convert.space_ended_event(message)]
        )
        await outbox.append(
            tx.conn,
            "space.ended",
            convert.space_name(after.id),
            convert.ended_event(after, await tx.unique_participant_count(after.id)),
        )
        return message

    async def cancel_space(
        self, caller: str | None, space_id: str, reason: EndReason = EndReason.HOST_CANCELED
    ) -> res.Space:
        """CancelSpace."""
        if caller is not None:
            await self.seen(space_id, caller)
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            after = domain.cancel(space, caller, now, reason)
            if after is None:
                return await self._space_pb(tx, space, caller)
            await tx.save_space(after)
            message = await self._space_pb(tx, after, caller)
            await self._append(tx, space_id, [convert.space_ended_event(message)])
            await outbox.append(
                tx.conn,
                "space.canceled",
                convert.space_name(space_id),
                convert.canceled_event(after),
            )
        return message

    # --- joining ----------------------------------------------------------------------------

    async def join(
        self, caller: str, request: pb.JoinSpaceRequest, space_id: str
    ) -> pb.JoinSpaceResponse:
        """JoinSpace, admitted while fewer than ``max_concurrent_joins`` are in progress.

        :raises ResourceExhausted: ``JOINS_BUSY`` (retry in a second) past the bound.
        """
        async with self._joins.admit():
            return await self._join(caller, request, space_id)

    async def _join(
        self, caller: str, request: pb.JoinSpaceRequest, space_id: str
    ) -> pb.JoinSpaceResponse:
        """Checks, then one transaction claiming the key and adding the participant."""
        digest = fingerprint(request)
        async with self._store.transaction() as tx:
            first = await tx.lookup_idempotency(caller, "JoinSpace", request.request_id)
        if first is not None:
            if first.fingerprint != digest:
                raise key_reused()
            if first.response is not None:
                return pb.JoinSpaceResponse.FromString(first.response)
        seen = await self.seen(space_id, caller, request.join_link_token)
        space = seen.space
        domain.require_live(space)
        me = seen.me
        on_stage = me is not None and me.active and me.role.on_stage
        if space.ticketed and not domain.ticket_exempt(
            space, caller, invited=seen.invited, on_stage=on_stage
        ):
            if not await self._payments.has_ticket(space_id, caller):
                raise PermissionDenied("a ticket is required", reason="TICKET_REQUIRED")
        may_publish = caller == space.host_id or on_stage
        placement = await self._place(space, caller, may_publish, "")
        now = utcnow()
        async with self._store.transaction() as tx:
            claim = await tx.claim_idempotency(caller, "JoinSpace", request.request_id, digest)
            if not claim.new:
                if claim.fingerprint != digest or claim.response is None:
                    raise key_reused()
                return pb.JoinSpaceResponse.FromString(claim.response)
            current = await tx.get_space(space_id)
            if current is None:
                raise domain.space_not_found()
            domain.require_live(current)
            if await tx.is_banned(space_id, caller):
                raise PermissionDenied(
                    "you were removed from this Space", reason="REMOVED_FROM_SPACE"
                )
            existing = await tx.get_participant(space_id, caller)
            counts = await tx.counts(space_id) if self._limits.max_participants else Counts()
            participant = domain.join(current, caller, existing, counts, self._limits, now)
            if participant is not existing:
                await tx.save_participant(participant)
                await self._announce_presence(tx, participant, convert.joined_event(participant))
            token, grant = self._grants.sign(
                space_id=space_id,
                user_id=caller,
                role=participant.role.grant_name,
                may_publish=participant.role.on_stage,
                node=placement.node,
                now=now,
            )
            response = pb.JoinSpaceResponse(
                participant=convert.participant_pb(participant),
                media_grant=res.MediaGrant(
                    token=token,
                    expire_time=convert.ts(grant.expire_time),
                    endpoint=res.MediaEndpoint(
                        node=placement.node,
                        uri=placement.endpoint or self._settings.media_public_uri,
                    ),
                    may_publish=grant.may_publish,
                ),
                recording=current.recording,
            )
            await tx.complete_idempotency(
                caller, "JoinSpace", request.request_id, response.SerializeToString()
            )
        if participant is not existing:
            await self._counts_changed(space_id)
            if existing is not None:
                # A rejoin after a removal: media must forget the earlier "removed".
                await self._push_media(participant)
        return response

    async def leave_space(self, caller: str, space_id: str) -> None:
        """LeaveSpace."""
        seen = await self.seen(space_id, caller)
        if caller == seen.space.host_id and seen.space.state is State.LIVE:
            raise FailedPrecondition("the host ends the Space instead", reason="HOST_CANNOT_LEAVE")
        async with self._store.transaction() as tx:
            await tx.get_space(space_id, lock=True)
            me = await tx.get_participant(space_id, caller)
            if me is None or not me.active:
                return
            after = domain.leave(me)
            await tx.save_participant(after)
            await self._announce_presence(tx, me, convert.left_event(after))
        await self._counts_changed(space_id)
        await self._push_media(after, removed=True)

    # --- participants -----------------------------------------------------------------------

    async def get_participant(
        self, caller: str | None, space_id: str, user_id: str
    ) -> res.Participant:
        """GetParticipant."""
        seen = await self.seen(space_id, caller)
        async with self._store.transaction() as tx:
            target = domain.require_active(await tx.get_participant(space_id, user_id))
        actor = domain.actor_of(seen.space, caller, seen.me) if caller else Actor.HOST
        private = actor in (Actor.HOST, Actor.CO_HOST) or caller == user_id
        return convert.participant_pb(target, private=private, self_view=caller == user_id)

    async def list_participants(
        self,
        caller: str | None,
        space_id: str,
        roles: Sequence[Role],
        hands_only: bool,
        size: int,
        token: str,
    ) -> pb.ListParticipantsResponse:
        """ListParticipants: keyset pages, as ListSpaces (the token names the last
        participant listed, so someone joining or leaving meanwhile never makes the others
        repeat or go missing; one whose role changes moves to its new place)."""
        seen = await self.seen(space_id, caller)
        actor = domain.actor_of(seen.space, caller, seen.me) if caller else Actor.HOST
        moderator = actor in (Actor.HOST, Actor.CO_HOST)
        if hands_only and not moderator:
            raise domain.not_moderator()
        query = f"{space_id}|{sorted(int(r) for r in roles)}|{hands_only}"
        now = utcnow()
        cursor = self._pages.after(token, query, now, None)
        size = size or 50
        async with self._store.transaction() as tx:
            rows = await tx.list_participants(
                space_id, roles=roles, hands_only=hands_only, after=cursor, limit=size + 1
            )
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListParticipantsResponse(
            participants=[
                convert.participant_pb(
                    p, private=moderator or p.user_id == caller, self_view=p.user_id == caller
                )
                for p, _ in rows
            ],
            next_page_token=self._pages.issue_after(query, rows[-1][1], now) if more else "",
        )

    # --- moderation -------------------------------------------------------------------------

    async def _moderate(
        self,
        caller: str,
        space_id: str,
        target_id: str,
        decide: Any,
        *,
        lock: bool = True,
    ) -> Participant:
        """Run one moderation step: visibility, then the rule under the Space's row lock."""
        await self.seen(space_id, caller)
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=lock)
            if space is None:
                raise domain.space_not_found()
            me = await tx.get_participant(space_id, caller)
            target = me if target_id == caller else await tx.get_participant(space_id, target_id)
            actor = domain.actor_of(space, caller, me)
            counts = await tx.counts(space_id)
            change: Change = decide(space, actor, me, target, counts)
            if change.participant != change.before:
                await tx.save_participant(change.participant)
                await self._append(tx, space_id, convert.change_events(change, caller))
                if Role.CO_HOST in (change.before.role, change.participant.role):
                    await self._co_hosts_changed(tx, space)
                await self._outbox_for(tx, space, change, caller)
        if change.role_changed:
            await self._counts_changed(space_id)
        if change.media:
            await self._push_media(change.participant)
            if change.participant.role.on_stage and not change.before.role.on_stage:
                await self._move_to_origin(space_id, change.participant)
        return change.participant

    async def _outbox_for(self, tx: RoomsTx, space: Space, change: Change, caller: str) -> None:
        if change.invitation is None:
            return
        invitation, state = change.invitation
        if state is not domain.InvitationState.PENDING:
            return
        when = convert.ts(invitation.create_time)
        if invitation.kind is InvitationKind.SPEAK:
            await outbox.append(
                tx.conn,
                "space.speak_invitation",
                convert.space_name(space.id),
                ev.SpeakInvitationEvent(
                    space_id=space.id,
                    invitee_id=change.participant.user_id,
                    inviter_id=caller,
                    event_time=when,
                ),
            )
        else:
            await outbox.append(
                tx.conn,
                "space.co_host_invitation",
                convert.space_name(space.id),
                ev.CoHostInvitationEvent(
                    space_id=space.id,
                    invitee_id=change.participant.user_id,
                    inviter_id=caller,
                    event_time=when,
                ),
            )

    async def request_to_speak(self, caller: str, space_id: str) -> Participant:
        """RequestToSpeak."""
        seen = await self.seen(space_id, caller)
        host_follows = False
        if seen.space.speak_permission is SpeakPermission.FOLLOWED_BY_HOST:
            host_follows = await self._host_follows(seen.space, caller)
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            me = await tx.get_participant(space_id, caller)
            after = domain.request_to_speak(space, me, host_follows_me=host_follows, now=now)
            if after is not me:
                await tx.save_participant(after)
                await self._append(tx, space_id, [convert.hand_raised_event(after)])
                moderators = [space.host_id, *await tx.co_host_ids(space_id)]
                await outbox.append(
                    tx.conn,
                    "space.speak_requested",
                    convert.space_name(space_id),
                    ev.SpeakRequestedEvent(
                        space_id=space_id,
                        requester_id=caller,
                        moderator_ids=moderators,
                        event_time=convert.ts(now),
                    ),
                )
        return after

    async def cancel_speak_request(self, caller: str, space_id: str) -> Participant:
        """CancelSpeakRequest."""
        return await self._moderate(
            caller, space_id, caller, lambda s, a, me, t, c: domain.cancel_speak_request(s, me)
        )

    async def approve(self, caller: str, space_id: str, target: str) -> Participant:
        """ApproveSpeaker."""
        return await self._moderate(
            caller,
            space_id,
            target,
            lambda s, a, me, t, c: domain.approve(s, a, t, c, self._limits),
        )

    async def deny(self, caller: str, space_id: str, target: str) -> Participant:
        """DenySpeaker."""
        return await self._moderate(
            caller, space_id, target, lambda s, a, me, t, c: domain.deny(s, a, t)
        )

    async def invite_to_speak(self, caller: str, space_id: str, target: str) -> Participant:
        """InviteToSpeak."""
        now = utcnow()
        return await self._moderate(
            caller,
            space_id,
            target,
            lambda s, a, me, t, c: domain.invite_to_speak(s, a, caller, t, c, self._limits, now),
        )

    async def accept_speak(self, caller: str, space_id: str) -> Participant:
        """AcceptSpeakInvitation."""
        return await self._moderate(
            caller,
            space_id,
            caller,
            lambda s, a, me, t, c: domain.accept_speak_invitation(s, me, c, self._limits),
        )

    async def decline(self, caller: str, space_id: str, kind: InvitationKind) -> Participant:
        """Decline{Speak,CoHost}Invitation."""
        return await self._moderate(
            caller, space_id, caller, lambda s, a, me, t, c: domain.decline_invitation(me, kind)
        )

    async def revoke_speaker(self, caller: str, space_id: str, target: str) -> Participant:
        """RevokeSpeaker."""
        return await self._moderate(
            caller, space_id, target, lambda s, a, me, t, c: domain.revoke_speaker(s, a, caller, t)
        )

    async def add_co_host(self, caller: str, space_id: str, target: str) -> Participant:
        """AddCoHost."""
        now = utcnow()
        return await self._moderate(
            caller,
            space_id,
            target,
            lambda s, a, me, t, c: domain.add_co_host(s, caller, t, target, c, self._limits, now),
        )

    async def accept_co_host(self, caller: str, space_id: str) -> Participant:
        """AcceptCoHostInvitation."""
        now = utcnow()
        return await self._moderate(
            caller,
            space_id,
            caller,
            lambda s, a, me, t, c: domain.accept_co_host_invitation(s, me, c, self._limits, now),
        )

    async def remove_co_host(self, caller: str, space_id: str, target: str) -> Participant:
        """RemoveCoHost."""
        return await self._moderate(
            caller,
            space_id,
            target,
            lambda s, a, me, t, c: domain.remove_co_host(s, caller, t, c, self._limits),
        )

    async def _co_hosts_changed(self, tx: RoomsTx, space: Space) -> None:
        """The co-host list is a Space field: bump the version and announce the Space."""
        space = dataclasses.replace(space, version=space.version + 1, update_time=utcnow())
        await tx.save_space(space)
        message = await self._space_pb(tx, space, None)
        await self._append(tx, space.id, [convert.space_updated_event(message)])

    async def mute(self, caller: str, space_id: str, target: str) -> Participant:
        """MuteParticipant."""
        return await self._moderate(
            caller, space_id, target, lambda s, a, me, t, c: domain.mute(s, a, t)
        )

    async def set_own_mute(self, caller: str, space_id: str, muted: bool) -> Participant:
        """SetOwnMute."""
        return await self._moderate(
            caller, space_id, caller, lambda s, a, me, t, c: domain.set_own_mute(s, me, muted)
        )

    async def remove_participant(
        self, caller: str, space_id: str, target_id: str, block: bool
    ) -> None:
        """RemoveParticipant."""
        await self.seen(space_id, caller)
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            me = await tx.get_participant(space_id, caller)
            actor = domain.actor_of(space, caller, me)
            target = await tx.get_participant(space_id, target_id)
            after = domain.remove(space, actor, caller, target, target_id)
            await tx.save_participant(after)
            if block:
                await tx.ban(space_id, target_id, caller, now)
            if target is not None and target.role is Role.CO_HOST:
                await self._co_hosts_changed(tx, space)
            await self._append(tx, space_id, [convert.removed_event(after, caller, block)])
        await self._counts_changed(space_id)
        await self._push_media(after, removed=True)

    async def set_speak_permission(
        self, caller: str, space_id: str, permission: SpeakPermission
    ) -> res.Space:
        """SetSpeakPermission."""
        seen = await self.seen(space_id, caller)
        actor = domain.actor_of(seen.space, caller, seen.me)
        domain.require_moderator(actor)
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            domain.require_moderator(
                domain.actor_of(space, caller, await tx.get_participant(space_id, caller))
            )
            domain.require_not_over(space)
            after = dataclasses.replace(
                space, speak_permission=permission, update_time=now, version=space.version + 1
            )
            await tx.save_space(after)
            message = await self._space_pb(tx, after, caller)
            await self._append(tx, space_id, [convert.space_updated_event(message)])
            if after.state is State.LIVE:
                await self._lower_hands(tx, after)
        return message

    async def _lower_hands(self, tx: RoomsTx, space: Space) -> None:
        raised = [
            p
            for p, _ in await tx.list_participants(
                space.id, roles=[Role.LISTENER], hands_only=True, after=None, limit=10_000
            )
        ]
        followed: set[str] = set()
        if space.speak_permission is SpeakPermission.FOLLOWED_BY_HOST:
            for p in raised:
                if await self._identity.follows(space.host_id, p.user_id):
                    followed.add(p.user_id)
        for change in domain.lower_hands_for_permission(space.speak_permission, raised, followed):
            await tx.save_participant(change.participant)
            await self._append(tx, space.id, convert.change_events(change, space.host_id))

    async def set_captions(self, caller: str, space_id: str, enabled: bool) -> Participant:
        """SetCaptionsEnabled."""
        await self.seen(space_id, caller)
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id)
            if space is None:
                raise domain.space_not_found()
            domain.require_live(space)
            me = domain.require_self_joined(await tx.get_participant(space_id, caller))
            if enabled and not space.captions_available:
                raise FailedPrecondition(
                    "captions are not produced for this Space", reason="CAPTIONS_UNAVAILABLE"
                )
            after = dataclasses.replace(me, captions_enabled=enabled)
            if after != me:
                await tx.save_participant(after)
                # Through the ordered log, so the watcher's open streams (on any replica)
                # switch exactly here: caption segments after it follow the new setting.
                await self._append(tx, space_id, [convert.captions_event(after)])
        return after

    # --- invitations, links, pins -------------------------------------------------------------

    async def _require_moderator_of(self, caller: str, space_id: str) -> Seen:
        seen = await self.seen(space_id, caller)
        domain.require_moderator(domain.actor_of(seen.space, caller, seen.me))
        return seen

    async def invite_users(self, caller: str, space_id: str, user_ids: Sequence[str]) -> int:
        """InviteUsers; returns the invite list's size."""
        seen = await self._require_moderator_of(caller, space_id)
        domain.require_not_over(seen.space)
        missing = await self._identity.missing_users(user_ids)
        if missing is not None:
            raise NotFound(
                "a user does not exist",
                reason="USER_NOT_FOUND",
                metadata={"name": convert.user_name(missing)},
            )
        blocked = await self._identity.blocked_between(seen.space.host_id, user_ids)
        wanted = [u for u in user_ids if u not in blocked and u != seen.space.host_id]
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            domain.require_not_over(space)
            count = await tx.invite_count(space_id)
            new_ids = await tx.add_invites(space_id, wanted, caller, now)
            if count + len(new_ids) > self._settings.max_invited_users:
                raise ResourceExhausted(
                    "the invite list is full",
                    reason="INVITE_LIMIT_REACHED",
                    quota_subject="space",
                    quota_description=f"{self._settings.max_invited_users} invited users",
                )
            if new_ids:
                await outbox.append(
                    tx.conn,
                    "space.invitation",
                    convert.space_name(space_id),
                    ev.SpaceInvitationEvent(
                        space_id=space_id,
                        inviter_id=caller,
                        invitee_ids=new_ids,
                        title=space.title,
                        state=int(space.state),  # type: ignore[arg-type]
                        scheduled_start_time=convert.ts(
                            space.scheduled_start_time if space.state is State.SCHEDULED else None
                        ),
                        event_time=convert.ts(now),
                    ),
                )
            return count + len(new_ids)

    async def create_join_link(self, caller: str, space_id: str, ttl: timedelta) -> res.JoinLink:
        """CreateJoinLink."""
        seen = await self._require_moderator_of(caller, space_id)
        domain.require_not_over(seen.space)
        token, uri, expires = self._links.issue(space_id, ttl, utcnow())
        return res.JoinLink(token=token, uri=uri, expire_time=convert.ts(expires))

    async def pin_message(
        self, caller: str, space_id: str, text: str, uri: str
    ) -> res.PinnedMessage | None:
        """PinMessage."""
        await self.seen(space_id, caller)
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            domain.require_moderator(
                domain.actor_of(space, caller, await tx.get_participant(space_id, caller))
            )
            domain.require_live(space)
            pinned = Pinned(text, uri, caller, now) if text or uri else None
            after = dataclasses.replace(
                space, pinned=pinned, update_time=now, version=space.version + 1
            )
            await tx.save_space(after)
            await self._append(tx, space_id, [convert.pinned_event(pinned)])
        return convert.pinned_pb(pinned)

    # --- reactions, reminders, reports ------------------------------------------------------

    async def send_reaction(self, caller: str, space_id: str, emoji: res.Emoji.ValueType) -> None:
        """SendReaction, rate limited per participant with a one-second Redis counter."""
        seen = await self.seen(space_id, caller)
        domain.require_live(seen.space)
        domain.require_self_joined(seen.me)
        window = int(time.time())
        key = f"rooms:reactions:{space_id}:{caller}:{window}"
        pipe = self._redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 2)
        count, _ = await pipe.execute()
        limit = self._settings.reactions_per_second
        if int(count) > limit:
            raise ResourceExhausted(
                "too many reactions",
                reason="RATE_LIMITED",
                quota_subject="participant",
                quota_description=f"{limit} reactions per second",
                retry_after=1.0,
            )
        await self._events.add_reaction(space_id, caller, emoji)

    async def create_reminder(self, caller: str, space_id: str) -> res.Reminder:
        """CreateReminder."""
        seen = await self.seen(space_id, caller)
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            if space.state is not State.SCHEDULED:
                raise FailedPrecondition("the Space is not scheduled", reason="SPACE_NOT_SCHEDULED")
            existing = await tx.get_reminder(space_id, caller)
            created = existing or await tx.add_reminder(space_id, caller, now)
            if existing is None:
                await outbox.append(
                    tx.conn,
                    "reminder.set",
                    f"spaces/{space_id}/reminders/{caller}",
                    ev.ReminderSetEvent(
                        space_id=space_id,
                        user_id=caller,
                        scheduled_start_time=convert.ts(space.scheduled_start_time),
                        event_time=convert.ts(now),
                    ),
                )
        del seen
        return res.Reminder(
            name=f"spaces/{space_id}/reminders/{caller}",
            user=convert.user_name(caller),
            create_time=convert.ts(created),
        )

    async def delete_reminder(self, caller: str, space_id: str) -> None:
        """DeleteReminder."""
        await self.seen(space_id, caller)
        async with self._store.transaction() as tx:
            if await tx.delete_reminder(space_id, caller):
                await outbox.append(
                    tx.conn,
                    "reminder.deleted",
                    f"spaces/{space_id}/reminders/{caller}",
                    ev.ReminderDeletedEvent(
                        space_id=space_id, user_id=caller, event_time=convert.ts(utcnow())
                    ),
                )

    async def report(
        self, caller: str, space_id: str, target_id: str, reason: int, note: str
    ) -> str:
        """ReportSpace (``target_id`` empty) or ReportParticipant; returns the report id."""
        await self.seen(space_id, caller)
        if target_id == caller:
            raise InvalidArgument("you cannot report yourself", reason="TARGET_IS_CALLER")
        now = utcnow()
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id)
            if space is None:
                raise domain.space_not_found()
            if target_id:
                if await tx.get_participant(space_id, target_id) is None:
                    raise domain.participant_not_found()
            stage = [p for p in await tx.active_participants(space_id) if p.role.on_stage]
            context: dict[str, Any] = {
                "reported_at": now.isoformat(),
                "space_state": space.state.name,
                "stage": [
                    {
                        "user_id": p.user_id,
                        "role": p.role.name,
                        "muted": p.muted,
                        "connected": p.connected,
                    }
                    for p in stage
                ],
                # Who could be heard at that moment: on stage and not muted.
                "unmuted": [p.user_id for p in stage if not p.muted],
            }
            heard = await self._redis.get(f"rooms:speaking:{space_id}")
            if heard:
                # Media's latest voice activity report: who was actually speaking, when.
                context["speaking"] = json.loads(heard)
            if target_id:
                target = await tx.get_participant(space_id, target_id)
                assert target is not None
                context["target"] = {
                    "role": target.role.name,
                    "active": target.active,
                    "muted": target.muted,
                }
            return await tx.add_report(
                new_id(), space_id, caller, target_id, reason, note, context, now
            )

    # --- internal: captions, levels, presence, reconnects -------------------------------------

    async def post_caption(self, space_id: str, segment: res.CaptionSegment) -> int:
        """PostCaptionSegment."""
        speaker = segment.speaker.rsplit("/", 1)[-1]
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id, lock=True)
            if space is None:
                raise domain.space_not_found()
            domain.require_live(space)
            if await tx.get_participant(space_id, speaker) is None:
                raise domain.participant_not_found()
            if not space.captions_available:
                space = dataclasses.replace(
                    space, captions_available=True, version=space.version + 1, update_time=utcnow()
                )
                await tx.save_space(space)
                await self._append(
                    tx,
                    space_id,
                    [convert.space_updated_event(await self._space_pb(tx, space, None))],
                )
            return await self._events.append(
                tx.conn, space_id, ev.SpaceEvent(caption_segment=segment)
            )

    async def report_levels(
        self, space_id: str, levels: Sequence[res.SpeakingLevel], observed: datetime
    ) -> None:
        """ReportSpeakingLevels: stale reports dropped, unknown participants skipped."""
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id)
            if space is None:
                raise domain.space_not_found()
            domain.require_live(space)
            on_stage = {
                p.user_id for p in await tx.active_participants(space_id) if p.role.on_stage
            }
        key = f"rooms:levels:{space_id}"
        stamp = observed.timestamp()
        # Newer-wins compare-and-set in one round trip, so two media reports racing on
        # different replicas cannot let an old one through after a new one.
        accepted = await self._redis.eval(
            "local cur = redis.call('GET', KEYS[1])"
            " if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end"
            " redis.call('SET', KEYS[1], ARGV[1], 'EX', 3600) return 1",
            1,
            key,
            repr(stamp),
        )
        if not accepted:
            return
        kept = [lv for lv in levels if lv.participant.rsplit("/", 1)[-1] in on_stage]
        if kept:
            await self._events.add_speaking_levels(space_id, kept)
            # Who was heard last, and when: the context a report made now should carry.
            speaking = [lv.participant.rsplit("/", 1)[-1] for lv in kept if lv.speaking]
            await self._redis.set(
                f"rooms:speaking:{space_id}",
                json.dumps({"at": observed.isoformat(), "users": speaking}),
                ex=SPEAKING_CONTEXT_TTL_S,
            )

    async def report_peer_states(self, changes: Sequence[pb.PeerStateChange]) -> int:
        """ReportPeerStates: keep ``connected`` and host presence current."""
        applied = 0
        for change in changes:
            parts = change.participant.split("/")
            space_id, user_id = parts[1], parts[3]
            observed = change.observe_time.ToDatetime(tzinfo=UTC)
            connected = change.state == pb.PEER_STATE_CONNECTED
            async with self._store.transaction() as tx:
                space = await tx.get_space(space_id)
                p = await tx.get_participant(space_id, user_id)
                if space is None or p is None or not p.active or space.state is not State.LIVE:
                    continue
                if p.session_time is not None and observed < p.session_time:
                    continue  # about an older session or older news: ignore
                after = dataclasses.replace(
                    p,
                    connected=connected,
                    media_session=change.media_session,
                    session_time=observed,
                    disconnected_since=None if connected else (p.disconnected_since or observed),
                )
                await tx.save_participant(after)
                if user_id == space.host_id:
                    await tx.set_host_absent(
                        space_id, None if connected else after.disconnected_since
                    )
                applied += 1
        return applied

    async def request_reconnect(
        self, space_id: str, users: Sequence[str], reason: int, from_node: str
    ) -> int:
        """RequestMediaReconnect: place each again and send them a fresh grant."""
        async with self._store.transaction() as tx:
            space = await tx.get_space(space_id)
            if space is None:
                raise domain.space_not_found()
            domain.require_live(space)
            present = {p.user_id: p for p in await tx.active_participants(space_id)}
        notified = 0
        for user_id in users:
            p = present.get(user_id)
            if p is None:
                continue
            await self._reconnect(space, p, reason, avoid=from_node)
            notified += 1
        return notified

    async def on_identity_event(self, event: StreamEvent) -> None:
        """Consume identity's events: a host who blocks someone in their live Space removes
        them from it (blocked users never see or join the host's Spaces). Idempotent: a
        repeated event finds them gone."""
        if event.type != "user.blocked":
            return
        blocked = event.unpack(identity_events_pb2.UserBlockedEvent)
        async with self._store.transaction() as tx:
            space_id = await tx.live_space_of_host(blocked.blocker_id)
            target = await tx.get_participant(space_id, blocked.blocked_id) if space_id else None
        if space_id is None or target is None or not target.active:
            return
        logger.info("removing %s from space %s: the host blocked them", target.user_id, space_id)
        try:
            await self.remove_participant(blocked.blocker_id, space_id, target.user_id, False)
        except (NotFound, FailedPrecondition):
            return  # gone meanwhile, or the Space ended

    # --- discovery --------------------------------------------------------------------------

    async def discovery_feed(
        self, user_id: str, size: int, token: str
    ) -> pb.GetDiscoveryFeedResponse:
        """GetDiscoveryFeed: live Spaces around the people the user follows, then upcoming ones.

        The follow list comes from identity in one stream; the Spaces in one query; blocks
        in one batch call. The feed is built again for every page, so a token names the
        last item's position (bucket, time, id), not an offset: a Space that starts, ends
        or appears between two pages never makes the others repeat or go missing. Tokens
        expire in 10 minutes.
        """
        now = utcnow()
        cursor = self._pages.after(token, f"feed|{user_id}", now, FEED_TOKEN_TTL)
        size = size or 20
        following = await self._identity.following_ids(user_id, FEED_MAX_FOLLOWING)
        if not following:
            return pb.GetDiscoveryFeedResponse()
        followed = set(following)
        async with self._store.transaction() as tx:
            rows = await tx.feed_candidates(following, FEED_MAX_CANDIDATES)
        visible = await self._filter_visible([r.space for r in rows], user_id)
        # (bucket, time key, id): hosted, then followed participating, newest first; then
        # upcoming, soonest first.
        feed: list[tuple[tuple[int, int, str], res.DiscoveryFeedItem]] = []
        for row in rows:
            space = row.space
            if space.id not in visible or space.host_id == user_id:
                continue
            in_space = [u for u, _ in sorted(row.followed, key=lambda e: (not e[1].on_stage, e[1]))]
            on_stage_hosts = {u for u, role in row.followed if role in (Role.HOST, Role.CO_HOST)}
            async with self._store.transaction() as tx:
                message = await self._space_pb(tx, space, user_id)
            if space.state is State.LIVE:
                hosted = space.host_id in followed or bool(on_stage_hosts)
                started = time_key(space.start_time or space.create_time)
                feed.append(
                    (
                        (0 if hosted else 1, -started, space.id),
                        res.DiscoveryFeedItem(
                            space=message,
                            reason=res.DISCOVERY_REASON_HOSTED_BY_FOLLOWED
                            if hosted
                            else res.DISCOVERY_REASON_FOLLOWED_PARTICIPATING,
                            followed_participants=[convert.user_name(u) for u in in_space[:3]],
                            followed_participant_count=len(in_space),
                        ),
                    )
                )
            elif space.state is State.SCHEDULED and space.host_id in followed:
                when = time_key(space.scheduled_start_time or space.create_time)
                feed.append(
                    (
                        (2, when, space.id),
                        res.DiscoveryFeedItem(
                            space=message, reason=res.DISCOVERY_REASON_SCHEDULED_BY_FOLLOWED
                        ),
                    )
                )
        feed.sort(key=lambda entry: entry[0])
        rest = [entry for entry in feed if cursor is None or entry[0] > cursor]
        page = rest[:size]
        more = len(rest) > size
        return pb.GetDiscoveryFeedResponse(
            items=[item for _, item in page],
            next_page_token=self._pages.issue_after(f"feed|{user_id}", page[-1][0], now)
            if more
            else "",
        )

    # --- sweeping ---------------------------------------------------------------------------

    async def sweep(self) -> int:
        """End Spaces whose host stayed away, cancel Spaces never started, drop stale peers.

        Safe on every replica at once: candidates are locked with SKIP LOCKED, so each
        replica takes different ones. Returns how many things changed.
        """
        now = utcnow()
        done = 0
        ended: list[str] = []
        async with self._store.transaction() as tx:
            for space in await tx.absent_host_spaces(now - self._settings.host_absence_grace, 20):
                after = domain.end(space, None, now, EndReason.HOST_ABSENT)
                if after is not None:
                    await self._finish(tx, after)
                    ended.append(space.id)
        for space_id in ended:
            logger.info("space %s ended: the host stayed away", space_id)
            await self._close_media(space_id)
        done += len(ended)
        async with self._store.transaction() as tx:
            for space in await tx.overdue_scheduled(now - self._settings.start_grace, 20):
                after = domain.cancel(space, None, now, EndReason.NOT_STARTED)
                if after is not None:
                    await tx.save_space(after)
                    await self._append(
                        tx,
                        space.id,
                        [convert.space_ended_event(await self._space_pb(tx, after, None))],
                    )
                    await outbox.append(
                        tx.conn,
                        "space.canceled",
                        convert.space_name(space.id),
                        convert.canceled_event(after),
                    )
                    done += 1
        dropped: list[Participant] = []
        async with self._store.transaction() as tx:
            for p in await tx.stale_disconnected(
                now - self._settings.participant_disconnect_grace, 100
            ):
                after_p = domain.leave(p)
                await tx.save_participant(after_p)
                await self._announce_presence(tx, p, convert.left_event(after_p))
                dropped.append(after_p)
        for p in dropped:
            await self._push_media(p, removed=True)
        for space_id in {p.space_id for p in dropped}:
            await self._counts_changed(space_id)
        return done + len(dropped)
