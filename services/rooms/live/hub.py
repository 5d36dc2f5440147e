"""Per-replica fan-out of live events to WatchSpace streams.

A :class:`LiveHub` follows every Space that has a watcher in this process:

* One reader task multiplexes all of them with a single ``XREAD BLOCK`` over their Redis
  streams (plus a control stream of its own, written to wake it when a Space is added).
* Each Space's :class:`~services.rooms.live.feed.SpaceFeed` releases events strictly by
  sequence. A hole (another replica published out of order, or a publish was lost) is
  repaired from PostgreSQL after a short grace period.
* A checker reads the watched Spaces' last sequence numbers from PostgreSQL every second,
  so even a lost publish of a Space's latest event is delivered.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import redis.asyncio
from spaces.rooms.v1 import rooms_service_pb2

from services.common.auth import Principal
from services.common.context import optional_principal
from services.common.db import Pool
from services.common.errors import Unavailable
from services.common.tasks import reraise_if_cancelling, stop_tasks
from services.rooms.live.codec import EncodedEvent, assemble, stream_key
from services.rooms.live.feed import SpaceFeed
from services.rooms.live.log import SpaceEventLog, resume_tokens
from services.rooms.live.metrics import REPAIRED, WATCH_ENDS, WATCHED_SPACES, WATCHERS
from services.rooms.live.settings import LiveSettings
from services.rooms.live.store import EventStore
from services.rooms.live.watch import EventFilter, SnapshotProvider, WatchSession

logger = logging.getLogger(__name__)

__all__ = ["LiveHub"]

_BLOCK_MS = 5000
_READ_COUNT = 1000
_RETRY_S = 0.5


def _stream_id_key(stream_id: bytes) -> tuple[int, int]:
    ms, _, seq = stream_id.partition(b"-")
    return int(ms), int(seq or b"0")


class LiveHub:
    """Streams Spaces' events to this replica's watchers (see the module docs).

    :param pool: the rooms pool (repairs, replays, checks).
    :param redis: client for the fan-out streams; one of its connections stays in a
        blocking read.
    :param settings: live settings; read from the environment by default.
    :param event_log: this replica's log: its events reach local watchers straight after
        commit instead of through Redis.
    """

    def __init__(
        self,
        pool: Pool,
        redis: redis.asyncio.Redis,
        settings: LiveSettings | None = None,
        *,
        event_log: SpaceEventLog | None = None,
    ) -> None:
        self.settings = settings or LiveSettings()
        self._tokens = resume_tokens(self.settings)
        self._store = EventStore(pool)
        self._redis = redis
        self._feeds: dict[str, SpaceFeed] = {}
        self._opening: dict[str, asyncio.Future[None]] = {}
        self._control_key = f"spaces:rooms:live:hub:{uuid.uuid4().hex}"
        self._control_id = b"0-0"
        self._tasks: list[asyncio.Task[None]] = []
        self._chores: set[asyncio.Task[None]] = set()
        self._stopped = False
        if event_log is not None:
            event_log.add_commit_listener(self._on_local_commit)

    @property
    def watched_spaces(self) -> int:
        """Spaces with at least one watcher here."""
        return len(self._feeds)

    @property
    def watchers(self) -> int:
        """Watchers in this replica."""
        return sum(feed.watchers for feed in self._feeds.values())

    async def start(self) -> None:
        """Start reading and checking."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._read_forever(), name="live hub reader"),
                asyncio.create_task(self._check_forever(), name="live hub checker"),
            ]

    async def stop(self) -> None:
        """End every watcher's stream (resumably) and stop."""
        self._stopped = True
        for feed in self._feeds.values():
            feed.close()
            WATCHED_SPACES.dec()
        self._feeds.clear()
        await stop_tasks(self._tasks)
        self._tasks = []
        try:
            await self._redis.delete(self._control_key)
        except Exception:
            logger.debug("could not delete the hub's control stream", exc_info=True)

    def watch(
        self,
        space_id: str,
        resume_token: str,
        snapshot_provider: SnapshotProvider,
        *,
        participant_filter: EventFilter | None = None,
        principal: Principal | None = None,
    ) -> AsyncIterator[rooms_service_pb2.WatchSpaceResponse]:
        """Stream ``space_id``'s events: the WatchSpace stream, minus authorization.

        See :meth:`watch_encoded` for the parameters; this yields messages.
        """
        return self._stream(  # type: ignore[return-value]
            space_id,
            resume_token,
            snapshot_provider,
            participant_filter=participant_filter,
            principal=principal,
            encoded=False,
        )

    def watch_encoded(
        self,
        space_id: str,
        resume_token: str,
        snapshot_provider: SnapshotProvider,
        *,
        participant_filter: EventFilter | None = None,
        principal: Principal | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream ``space_id``'s events as serialized ``WatchSpaceResponse`` messages.

        For a gRPC method whose response serializer passes ``bytes`` through (see
        ``services.rooms.api.add_to_server``): a live response that every unfiltered
        watcher sends is then encoded once for all of them, not once per watcher.
        """
        return self._stream(  # type: ignore[return-value]
            space_id,
            resume_token,
            snapshot_provider,
            participant_filter=participant_filter,
            principal=principal,
            encoded=True,
        )

    async def _stream(
        self,
        space_id: str,
        resume_token: str,
        snapshot_provider: SnapshotProvider,
        *,
        participant_filter: EventFilter | None,
        principal: Principal | None,
        encoded: bool,
    ) -> AsyncIterator[rooms_service_pb2.WatchSpaceResponse | bytes]:
        """Stream ``space_id``'s events: the WatchSpace stream, minus authorization.

        Starts with a snapshot, or, given a resume token still covered by retention, with
        the events after it (reactions and speaking levels are not replayed). Then follows
        the Space live, batching events that are ready together. Ends after space_ended
        (or at once when the snapshot shows the Space over).

        :param space_id: the Space's id.
        :param resume_token: the last event's resume_token; empty for a snapshot.
        :param snapshot_provider: ``(space_id, principal) -> Snapshot``.
        :param participant_filter: which events this watcher may see; ``None`` for all.
        :param principal: the watcher; the current call's principal by default.
        :raises InvalidArgument: RESUME_TOKEN_INVALID.
        :raises Unavailable: WATCHER_TOO_SLOW or WATCH_INTERRUPTED: resume with the last
            token.
        """
        after = self._tokens.decode(space_id, resume_token) if resume_token else None
        if self._stopped:
            raise Unavailable(
                "this rooms replica is shutting down", reason="WATCH_INTERRUPTED", retry_after=0.5
            )
        if principal is None:
            principal = optional_principal()
        feed = await self._open(space_id)
        ending = "closed"  # unless the loop below says otherwise: the client went away
        try:
            session = WatchSession(
                space_id,
                after,
                feed,
                self._store,
                self._tokens,
                snapshot_provider,
                principal,
                participant_filter,
                self.settings.replay_batch_size,
                encoded=encoded,
            )
            async for response in session.responses():
                yield response
            ending = "space_ended"
        except Unavailable as error:
            ending = "too_slow" if error.reason == "WATCHER_TOO_SLOW" else "interrupted"
            raise
        finally:
            WATCH_ENDS.labels(ending).inc()
            self._release(feed)

    async def _open(self, space_id: str) -> SpaceFeed:
        loop = asyncio.get_running_loop()
        while True:
            feed = self._feeds.get(space_id)
            if feed is not None and not feed.closed:
                feed.watchers += 1
                WATCHERS.inc()
                return feed
            opening = self._opening.get(space_id)
            if opening is not None:
                # Another watcher is setting the feed up; look again once it is done
                # (and set it up ourselves should that have failed).
                await asyncio.wait([opening])
                continue
            opening = loop.create_future()
            self._opening[space_id] = opening
            try:
                feed = await self._new_feed(space_id)
                feed.watchers += 1
                WATCHERS.inc()
                WATCHED_SPACES.inc()
                return feed
            finally:
                del self._opening[space_id]
                opening.set_result(None)

    async def _new_feed(self, space_id: str) -> SpaceFeed:
        key = stream_key(space_id)
        # Stream position first, then the log's: every event after the log's last one is
        # published after this position, so the reader sees it (or it is repaired).
        newest: Any = await self._redis.xrevrange(key, count=1)
        stream_id = newest[0][0] if newest else b"0-0"
        last_seq = await self._store.last_seq(space_id)
        feed = SpaceFeed(
            space_id,
            last_seq + 1,
            stream_id,
            capacity=self.settings.watcher_max_lag,
            flush_interval_s=self.settings.flush_interval_s,
        )
        self._feeds[space_id] = feed
        # Not awaited: the caller counts itself in before anything can close the feed.
        self._background(self._wake_reader())
        return feed

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._chores.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._chores.discard)

    def _release(self, feed: SpaceFeed) -> None:
        feed.watchers -= 1
        WATCHERS.dec()
        if feed.watchers <= 0 and self._feeds.get(feed.space_id) is feed:
            del self._feeds[feed.space_id]
            WATCHED_SPACES.dec()
            feed.close()

    async def _wake_reader(self) -> None:
        try:
            await self._redis.xadd(self._control_key, {"w": b"1"}, maxlen=16, approximate=True)
            await self._redis.expire(self._control_key, 3600)
        except Exception:
            # The reader notices the new Space at its next timeout instead.
            logger.warning("could not wake the live hub reader", exc_info=True)

    async def _read_forever(self) -> None:
        while True:
            streams: dict[Any, Any] = {self._control_key: self._control_id}
            for space_id, feed in self._feeds.items():
                streams[stream_key(space_id)] = feed.stream_id
            try:
                response: Any = await self._redis.xread(streams, count=_READ_COUNT, block=_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelling()
                logger.exception("reading live streams failed; retrying")
                await asyncio.sleep(_RETRY_S)
                continue
            for key, entries in response or []:
                self._on_entries(key, entries)

    def _on_entries(self, key: bytes, entries: list[Any]) -> None:
        if not entries:
            return
        name = key.decode()
        if name == self._control_key:
            self._control_id = entries[-1][0]
            return
        feed = self._feeds.get(name.removeprefix(stream_key("")))
        if feed is None:
            return  # its last watcher left while the read was in flight
        for entry_id, fields in entries:
            if _stream_id_key(entry_id) <= _stream_id_key(feed.stream_id):
                continue
            feed.stream_id = entry_id
            seq = int(fields[b"seq"])
            if seq >= feed.next_seq:
                feed.offer(EncodedEvent.from_bytes(seq, fields[b"data"]))
        self._repair_later(feed)

    def _on_local_commit(self, space_id: str, seq: int, data: bytes) -> None:
        feed = self._feeds.get(space_id)
        if feed is not None and seq >= feed.next_seq:
            feed.offer(EncodedEvent.from_bytes(seq, data))
            self._repair_later(feed)

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval_s)
            if not self._feeds:
                continue
            try:
                last = await self._store.last_seqs(list(self._feeds))
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelling()
                logger.exception("checking watched Spaces' last events failed")
                continue
            for space_id, last_seq in last.items():
                feed = self._feeds.get(space_id)
                if feed is not None:
                    feed.note_last_seq(last_seq)
                    self._repair_later(feed)

    def _repair_later(self, feed: SpaceFeed) -> None:
        if feed.missing() is None or feed.repair is not None or feed.closed:
            return
        feed.repair = asyncio.create_task(self._repair(feed), name=f"live repair {feed.space_id}")

    async def _repair(self, feed: SpaceFeed) -> None:
        try:
            # Most holes are events another replica published a moment later than its
            # successor; they arrive through Redis within the grace period.
            await asyncio.sleep(self.settings.gap_grace_s)
            missing = feed.missing()
            if missing is None:
                return
            first, last = missing
            rows = await self._store.read_range(feed.space_id, first, last)
            logger.debug("space %s: repaired %d..%d from the log", feed.space_id, first, last)
            REPAIRED.inc(len(rows))
            for row in rows:
                if row.body is None:
                    continue  # read_range always returns bodies
                data = assemble(self._tokens, feed.space_id, row.seq, row.event_time, row.body)
                feed.offer(EncodedEvent.from_bytes(row.seq, data))
            if feed.next_seq == first:
                # Committed events are never missing from the log unless pruned.
                feed.skip_to(rows[0].seq if rows else last + 1)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("repairing space %s from the log failed", feed.space_id)
            await asyncio.sleep(_RETRY_S)
        finally:
            feed.repair = None
        self._repair_later(feed)
