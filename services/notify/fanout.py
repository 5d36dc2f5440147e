"""Follower fan-out: "X is hosting" / "X scheduled a Space" to every follower, as durable jobs.

An event handler only records a ``fanout_jobs`` row (cheap, in the event's transaction), so
a host with a million followers never holds up the event stream. Fan-out workers, separate
tasks on every replica, lease jobs and process them in batches:

1. stream follower ids from identity (``StreamFollowerIds``) starting at the job's cursor,
   reading ahead while earlier batches are written;
2. per batch, in its own transaction on its own connection (up to ``writers`` batches at
   once): COPY the ids into a temporary staging table, INSERT … SELECT the notifications
   that pass the filters (disabled kind, muted host, blocks) and queue their webhook/push
   deliveries;
3. advance the job's cursor past the batches committed so far, in stream order, renewing
   the lease; then publish the new notifications of users with an open live stream.

A crash anywhere loses nothing and duplicates nothing: the cursor only ever points past
committed batches, so nothing is skipped, and the unique ``(user_id, dedupe_key)`` index
turns whatever is written again (a batch committed just before the crash, a follower
streamed twice after a re-follow, a worker that lost its lease) into nothing; see
:meth:`PostgresNotifyStore.write_fanout_rows`. After ``fanout_slice_batches`` batches a
worker hands the job back, so several big fan-outs take turns and small ones are not
stuck behind a million-follower host.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio
from spaces.identity.v1 import identity_service_pb2 as identity_pb
from spaces.identity.v1 import identity_service_pb2_grpc as identity_grpc
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_pb

from services.common.auth import ServiceTokenIssuer
from services.notify import metrics
from services.notify.live import LiveHub
from services.notify.store import FanoutJob, PostgresNotifyStore

logger = logging.getLogger(__name__)

__all__ = ["FanoutWorker", "FollowerSource", "IdentityDirectory"]

# Longest single StreamFollowerIds call; a worker re-opens the stream at its cursor after
# every slice anyway.
STREAM_TIMEOUT_S = 600.0
# What the reader hands the writer: a batch, the end (None) or the error that stopped it.
_Item = tuple[list[str], str] | Exception | None


@dataclass
class _Write:
    """A batch being written: its task, its ids (for live delivery) and the cursor after it."""

    task: asyncio.Task[int | None]
    ids: list[str]
    next_cursor: str

    def done(self) -> bool:
        """Whether the write has finished (successfully or not)."""
        return self.task.done()


class FollowerSource(Protocol):
    """Where followers come from (identity)."""

    def follower_batches(
        self, user_id: str, cursor: str, batch_size: int
    ) -> AsyncIterator[tuple[list[str], str]]:
        """Batches of follower ids after ``cursor``, each with the cursor after it."""
        ...

    async def following_ids(self, user_id: str) -> set[str]:
        """Everyone ``user_id`` follows."""
        ...


class IdentityDirectory:
    """Identity's follow graph and profiles over gRPC (service token).

    :param channel: channel to identity from :func:`services.common.clients.create_channel`.
    :param issuer: notify's service-token issuer.
    :param timeout_s: deadline of unary calls.
    """

    def __init__(
        self, channel: grpc.aio.Channel, issuer: ServiceTokenIssuer, *, timeout_s: float = 5.0
    ) -> None:
        self._stub = identity_grpc.IdentityServiceStub(channel)
        self._issuer = issuer
        self._timeout_s = timeout_s
        self._names: dict[str, tuple[float, str]] = {}

    async def follower_batches(
        self, user_id: str, cursor: str, batch_size: int
    ) -> AsyncIterator[tuple[list[str], str]]:
        """Stream follower ids from ``cursor``."""
        call = self._stub.StreamFollowerIds(
            identity_pb.StreamFollowerIdsRequest(
                parent=f"users/{user_id}", cursor=cursor, batch_size=batch_size
            ),
            timeout=STREAM_TIMEOUT_S,
            metadata=self._credentials(),
        )
        try:
            async for batch in call:
                yield list(batch.follower_ids), batch.cursor
        finally:
            call.cancel()

    async def following_ids(self, user_id: str) -> set[str]:
        """Everyone ``user_id`` follows (at most identity's follow limit)."""
        found: set[str] = set()
        call = self._stub.StreamFollowingIds(
            identity_pb.StreamFollowingIdsRequest(parent=f"users/{user_id}", batch_size=10_000),
            timeout=STREAM_TIMEOUT_S,
            metadata=self._credentials(),
        )
        async for batch in call:
            found.update(batch.following_ids)
        return found

    def _credentials(self) -> tuple[tuple[str, str], ...]:
        # The shared client interceptor does not add the service token to server-streaming
        # calls (their metadata reaches identity without it), so streams carry it explicitly.
        return (("authorization", f"Bearer {self._issuer.token()}"),)

    async def display_name(self, user_id: str) -> str:
        """A user's display name (cached for 5 minutes); empty when it cannot be had."""
        cached = self._names.get(user_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            response = await self._stub.GetUser(
                identity_pb.GetUserRequest(name=f"users/{user_id}"), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            logger.warning("could not get the name of user %s: %s", user_id, error.code())
            return ""
        name = response.user.display_name or response.user.handle
        if len(self._names) > 10_000:
            self._names.clear()
        self._names[user_id] = (time.monotonic() + 300.0, name)
        return name


class FanoutWorker:
    """One fan-out worker task: claims jobs, writes batches, hands jobs back.

    :param store: storage.
    :param source: the follow graph.
    :param hub: live delivery.
    :param owner: lease owner (the replica's consumer name plus the worker number).
    :param batch_size: followers per batch.
    :param slice_batches: batches before the job is handed back.
    :param writers: batches of one job written at once (each on its own connection).
    :param lease_s: lease length, renewed with every batch.
    :param pause_s: pause after each batch.
    :param idle_poll_s: sleep when there is no job.
    """

    def __init__(
        self,
        store: PostgresNotifyStore,
        source: FollowerSource,
        hub: LiveHub,
        *,
        owner: str,
        batch_size: int,
        slice_batches: int,
        lease_s: float,
        writers: int = 1,
        pause_s: float = 0.0,
        idle_poll_s: float = 0.2,
    ) -> None:
        self._store = store
        self._source = source
        self._hub = hub
        self._owner = owner
        self._batch_size = batch_size
        self._slice_batches = slice_batches
        self._writers = writers
        self._lease_s = lease_s
        self._pause_s = pause_s
        self._idle_poll_s = idle_poll_s

    async def run(self) -> None:
        """Work until cancelled."""
        while True:
            try:
                job = await self._store.claim_fanout_job(self._owner, self._lease_s)
                await self._update_lag()
                if job is None:
                    await asyncio.sleep(self._idle_poll_s)
                    continue
                await self.work(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("fan-out worker %s failed; retrying", self._owner)
                await asyncio.sleep(1.0)

    async def _update_lag(self) -> None:
        pending, oldest = await self._store.pending_fanouts()
        lag = 0.0 if oldest is None else (dt.datetime.now(dt.UTC) - oldest).total_seconds()
        metrics.FANOUT_LAG.set(max(0.0, lag))
        metrics.FANOUT_PENDING.set(pending)

    async def work(self, job: FanoutJob) -> None:
        """Write up to one slice of ``job``; finish it when the followers run out.

        Up to ``writers`` batches are written at once, each in its own transaction on its
        own connection; the cursor then advances over them in stream order, so it only
        ever points past batches that are committed. A crash between a batch's commit and
        its cursor update replays that batch, which the unique index turns into a no-op.
        """
        allowed: set[str] | None = None
        if job.visibility == rooms_pb.SPACE_VISIBILITY_INVITED_ONLY:
            # Invitees hear through SpaceInvitationEvent; followers must not learn of it.
            await self._store.finish_fanout_job(job.id, self._owner)
            return
        try:
            if job.visibility == rooms_pb.SPACE_VISIBILITY_FOLLOWED_BY_HOST:
                allowed = await self._source.following_ids(job.host_id)
            await self._write_slice(job, allowed)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            # The host's account is gone: nobody is left to tell, and retrying cannot help.
            await self._store.finish_fanout_job(job.id, self._owner)
            logger.warning("fan-out %s: host %s no longer exists; finished", job.id, job.host_id)

    async def _write_slice(self, job: FanoutJob, allowed: set[str] | None) -> None:
        batches: asyncio.Queue[_Item] = asyncio.Queue(maxsize=self._writers + 1)
        # Read ahead: identity streams the next batches while PostgreSQL writes these.
        reader = asyncio.create_task(self._read(job, batches), name=f"fanout read {job.id}")
        in_flight: collections.deque[_Write] = collections.deque()
        cursor = job.cursor
        read = 0
        try:
            while True:
                item = await batches.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    break
                ids, next_cursor = item
                if allowed is not None:
                    ids = [user for user in ids if user in allowed]
                in_flight.append(_Write(self._write(job, ids), ids, next_cursor))
                read += 1
                while in_flight and (len(in_flight) >= self._writers or in_flight[0].done()):
                    moved = await self._settle(job, in_flight.popleft(), cursor)
                    if moved is None:
                        return
                    cursor = moved
                if read >= self._slice_batches:
                    break
            while in_flight:
                moved = await self._settle(job, in_flight.popleft(), cursor)
                if moved is None:
                    return
                cursor = moved
            if item is None:
                took = await self._store.finish_fanout_job(job.id, self._owner)
                if took is not None:
                    metrics.FANOUT_DURATION.observe(took)
                logger.info("fan-out %s for spaces/%s is complete", job.id, job.space_id)
            else:
                await self._store.release_fanout_job(job.id, self._owner)
        finally:
            reader.cancel()
            for write in in_flight:
                write.task.cancel()
            await asyncio.gather(reader, *(w.task for w in in_flight), return_exceptions=True)

    def _write(self, job: FanoutJob, ids: list[str]) -> asyncio.Task[int | None]:
        async def write() -> int | None:
            started = time.perf_counter()
            created = await self._store.write_fanout_rows(job, self._owner, ids)
            metrics.FANOUT_BATCH_SECONDS.observe(time.perf_counter() - started)
            return created

        return asyncio.create_task(write(), name=f"fanout write {job.id}")

    async def _settle(self, job: FanoutJob, write: _Write, cursor: str) -> str | None:
        """Wait for the oldest batch in flight and move the cursor past it.

        :return: the new cursor, or ``None`` when the job is no longer ours.
        """
        created = await write.task
        if created is None or not await self._store.advance_fanout_cursor(
            job.id, self._owner, cursor, write.next_cursor, created, self._lease_s
        ):
            logger.info("fan-out %s was taken over or canceled; leaving it", job.id)
            return None
        metrics.NOTIFICATIONS_CREATED.labels("fanout").inc(created)
        await self._publish_live(write.ids, job.dedupe_key)
        if self._pause_s:
            await asyncio.sleep(self._pause_s)
        return write.next_cursor

    async def _read(self, job: FanoutJob, out: asyncio.Queue[_Item]) -> None:
        try:
            async for ids, next_cursor in self._source.follower_batches(
                job.host_id, job.cursor, self._batch_size
            ):
                await out.put((ids, next_cursor))
        except Exception as error:  # handed to the writer, which fails the slice
            await out.put(error)
            return
        await out.put(None)

    async def _publish_live(self, ids: list[str], dedupe_key: str) -> None:
        try:
            online = await self._hub.online_among(ids)
            if online:
                rows = await self._store.notifications_by_key(sorted(online), dedupe_key)
                await self._hub.publish_new(rows)
        except Exception:
            # Live delivery is best effort: the inbox has them and apps list on reconnect.
            logger.exception("publishing live fan-out notifications failed")
