"""One WatchSpace stream: catch up (snapshot or replay), then follow the Space live."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from spaces.rooms.v1 import rooms_events_pb2, rooms_resources_pb2, rooms_service_pb2

from services.common.auth import Principal
from services.common.errors import Unavailable
from services.rooms.live.codec import EncodedEvent, assemble, utc_now
from services.rooms.live.feed import FellBehind, SpaceFeed
from services.rooms.live.store import EventStore
from services.rooms.live.tokens import ResumeTokens

logger = logging.getLogger(__name__)

__all__ = ["EventFilter", "SnapshotProvider", "WatchSession"]

SnapshotProvider = Callable[
    [str, Principal | None], Awaitable[rooms_events_pb2.SpaceEvent.Snapshot]
]
"""``(space_id, principal) -> Snapshot``: the Space as the watcher may see it now."""

EventFilter = Callable[[rooms_events_pb2.SpaceEvent], bool]
"""Whether this watcher may see an event (e.g. caption segments only with captions on).
Called once per event per watcher: keep it cheap, and never modify the event."""

_OVER = (
    rooms_resources_pb2.SPACE_STATE_ENDED,
    rooms_resources_pb2.SPACE_STATE_CANCELED,
)
_LAST_KIND = "space_ended"


class WatchSession:
    """Produces the responses of one WatchSpace call.

    :param space_id: the Space.
    :param after: the sequence of the resume token, or ``None`` to start with a snapshot.
    :param feed: the Space's feed in this replica (the watcher is already counted in it,
        so nothing delivered from now on can be missed).
    :param store: reads the log for replays.
    :param tokens: mints the snapshot's resume token.
    :param snapshot_provider: builds the snapshot.
    :param principal: the watcher, passed to ``snapshot_provider``.
    :param event_filter: which events this watcher may see; ``None`` for all.
    :param replay_batch_size: most events per response while replaying.
    :param encoded: yield each response serialized (``bytes``), for a gRPC method whose
        response serializer passes bytes through: the live responses every unfiltered
        watcher shares are then encoded once for all of them.
    """

    def __init__(
        self,
        space_id: str,
        after: int | None,
        feed: SpaceFeed,
        store: EventStore,
        tokens: ResumeTokens,
        snapshot_provider: SnapshotProvider,
        principal: Principal | None,
        event_filter: EventFilter | None,
        replay_batch_size: int,
        *,
        encoded: bool = False,
    ) -> None:
        self._space_id = space_id
        self._after = after
        self._feed = feed
        self._store = store
        self._tokens = tokens
        self._snapshot_provider = snapshot_provider
        self._principal = principal
        self._filter = event_filter
        self._replay_batch_size = replay_batch_size
        self._encoded = encoded
        self._cursor = 0
        self._over = False

    async def responses(self) -> AsyncIterator[rooms_service_pb2.WatchSpaceResponse | bytes]:
        """Yield the stream's messages (serialized if ``encoded``); ends after space_ended.

        :raises Unavailable: WATCHER_TOO_SLOW when the watcher fell too far behind, or
            WATCH_INTERRUPTED when this replica stops; the client resumes with its last token.
        """
        async for response in self._catch_up():
            yield response.SerializeToString() if self._encoded else response
        while not self._over:
            if self._feed.closed:
                raise Unavailable(
                    "this rooms replica is shutting down; watch again with the last resume_token",
                    reason="WATCH_INTERRUPTED",
                    retry_after=0.5,
                )
            generation = self._feed.generation
            try:
                events = self._feed.events_after(self._cursor)
            except FellBehind:
                raise Unavailable(
                    "the watcher fell too far behind; watch again with the last resume_token",
                    reason="WATCHER_TOO_SLOW",
                ) from None
            if not events:
                await self._feed.wait(generation)
                continue
            self._cursor = events[-1].seq
            end_seq = self._feed.end_seq
            self._over = end_seq is not None and end_seq <= self._cursor
            live = self._live_response(events)
            if live is not None:
                yield live

    def _live_response(
        self, events: list[EncodedEvent]
    ) -> rooms_service_pb2.WatchSpaceResponse | bytes | None:
        if self._filter is not None:
            visible = [e for e in events if self._filter(e.event)]
            if not visible:
                return None
            if len(visible) != len(events):
                if self._encoded:
                    return self._feed.encoded_alone(visible)
                return rooms_service_pb2.WatchSpaceResponse(events=[e.event for e in visible])
        return self._feed.encoded(events) if self._encoded else self._feed.response(events)

    async def _catch_up(self) -> AsyncIterator[rooms_service_pb2.WatchSpaceResponse]:
        if self._after is not None:
            tail = await self._store.tail(self._space_id, self._after)
            if tail.complete_after(self._after):
                self._cursor = tail.last_seq
                batch: list[rooms_events_pb2.SpaceEvent] = []
                for stored in tail.events:
                    if stored.body is None:
                        continue  # ephemeral: not replayed
                    data = assemble(
                        self._tokens, self._space_id, stored.seq, stored.event_time, stored.body
                    )
                    event = rooms_events_pb2.SpaceEvent.FromString(data)
                    if event.WhichOneof("event") == _LAST_KIND:
                        self._over = True
                    if self._filter is not None and not self._filter(event):
                        continue
                    batch.append(event)
                    if len(batch) >= self._replay_batch_size:
                        yield rooms_service_pb2.WatchSpaceResponse(events=batch)
                        batch = []
                if batch:
                    yield rooms_service_pb2.WatchSpaceResponse(events=batch)
                return
            logger.info(
                "space %s: resume after %d is past retention; sending a snapshot",
                self._space_id,
                self._after,
            )
        yield await self._snapshot()

    async def _snapshot(self) -> rooms_service_pb2.WatchSpaceResponse:
        # The position is taken before the state is read: the snapshot reflects at least
        # every event up to it, and events it also reflects are sent again after it
        # (applying one again is harmless: events carry the resulting state), so nothing
        # is missed. The feed's position is never ahead of the log's and costs no query,
        # which matters when thousands of watchers (re)connect at once.
        last_seq = self._feed.next_seq - 1
        snapshot = await self._snapshot_provider(self._space_id, self._principal)
        event = rooms_events_pb2.SpaceEvent(
            sequence=last_seq,
            resume_token=self._tokens.encode(self._space_id, last_seq),
            snapshot=snapshot,
        )
        event.event_time.FromDatetime(utc_now())
        self._cursor = last_seq
        self._over = snapshot.space.state in _OVER
        return rooms_service_pb2.WatchSpaceResponse(events=[event])
