"""Follower fan-out: "X is hosting" / "X scheduled a Space" to every follower, as durable jobs.

An event handler only records a ``fanout_jobs`` row (cheap, in the event's transaction), so
a host with a million followers never holds up the event stream. Fan-out workers, separate
tasks on every replica, lease jobs and process them in batches:

1. stream follower ids from identity (``StreamFollowerIds``) starting at the job's cursor;
2. per batch, in one transaction: COPY the ids into a temporary staging table, INSERT …
   SELECT the notifications that pass the filters (disabled kind, muted host, blocks) with
   ``ON CONFLICT (user_id, dedupe_key) DO NOTHING``, queue their webhook/push deliveries,
   and advance the cursor;
3. after commit, publish the new notifications of users with an open live stream.

A crash anywhere loses nothing and duplicates nothing: the cursor and the batch commit
together, and a batch replayed after an unclean hand-over hits the unique index. After
``fanout_slice_batches`` batches a worker hands the job back, so several big fan-outs take
turns and small ones are not stuck behind a million-follower host.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

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
        pause_s: float = 0.0,
        idle_poll_s: float = 0.2,
    ) -> None:
        self._store = store
        self._source = source
        self._hub = hub
        self._owner = owner
        self._batch_size = batch_size
        self._slice_batches = slice_batches
        self._lease_s = lease_s
        self._pause_s = pause_s
        self._idle_poll_s = idle_poll_s

    async def run(self) -> None:
        """Work until cancelled."""
        while True:
            try:
                job = await self._store.claim_fanout_job(self._owner, self._lease_s)
                if job is None:
                    await self._update_lag()
                    await asyncio.sleep(self._idle_poll_s)
                    continue
                await self.work(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("fan-out worker %s failed; retrying", self._owner)
                await asyncio.sleep(1.0)

    async def _update_lag(self) -> None:
        oldest = await self._store.oldest_pending_fanout()
        lag = 0.0 if oldest is None else (dt.datetime.now(dt.UTC) - oldest).total_seconds()
        metrics.FANOUT_LAG.set(max(0.0, lag))

    async def work(self, job: FanoutJob) -> None:
        """Write up to one slice of ``job``; finish it when the followers run out."""
        allowed: set[str] | None = None
        if job.visibility == rooms_pb.SPACE_VISIBILITY_INVITED_ONLY:
            # Invitees hear through SpaceInvitationEvent; followers must not learn of it.
            await self._store.finish_fanout_job(job.id, self._owner)
            return
        if job.visibility == rooms_pb.SPACE_VISIBILITY_FOLLOWED_BY_HOST:
            allowed = await self._source.following_ids(job.host_id)
        cursor = job.cursor
        written = 0
        batches: asyncio.Queue[_Item] = asyncio.Queue(maxsize=2)
        # Read ahead: identity streams the next batch while PostgreSQL writes this one.
        reader = asyncio.create_task(self._read(job, batches), name=f"fanout read {job.id}")
        try:
            while True:
                item = await batches.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    await self._store.finish_fanout_job(job.id, self._owner)
                    logger.info("fan-out %s for spaces/%s is complete", job.id, job.space_id)
                    return
                ids, next_cursor = item
                if allowed is not None:
                    ids = [user for user in ids if user in allowed]
                started = time.perf_counter()
                created = await self._store.write_fanout_batch(
                    job, self._owner, cursor, ids, next_cursor, self._lease_s
                )
                if created is None:
                    logger.info("fan-out %s was taken over or canceled; leaving it", job.id)
                    return
                metrics.FANOUT_BATCH_SECONDS.observe(time.perf_counter() - started)
                metrics.NOTIFICATIONS_CREATED.labels("fanout").inc(created)
                cursor = next_cursor
                written += 1
                await self._publish_live(ids, job.dedupe_key)
                if written >= self._slice_batches:
                    await self._store.release_fanout_job(job.id, self._owner)
                    return
                if self._pause_s:
                    await asyncio.sleep(self._pause_s)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

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
