"""Wiring of the rooms process: ``python -m services.rooms.main``.

Start-up (before health turns SERVING): apply the migrations of schema ``rooms``, open the
pool and Redis, the channels to identity, payments and media, the live event log and hub,
then start the outbox relay, the consumer of identity's events (a host's block removes the
blocked user from their live Space; each replica also drops the pair from its block
cache), the gauge reader and the sweeper (absent hosts, Spaces never started, peers gone
too long). Every replica runs the same; the sweeper's SKIP LOCKED and the consumer group
keep them apart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc.aio
import redis.asyncio
from spaces.rooms.v1 import rooms_service_pb2 as pb

from services.common.auth import JwksSource, ServiceTokenIssuer
from services.common.clients import create_channel
from services.common.db import Pool, create_pool
from services.common.events import StreamConsumer, stream_name
from services.common.grants import MediaGrantSettings, MediaGrantSigner, MediaGrantVerifier
from services.common.jwks_client import IdentityJwksSource
from services.common.migrations import migrate
from services.common.outbox import OutboxRelay
from services.common.redis import create_redis
from services.common.server import Service, run_service
from services.common.settings import CommonSettings
from services.common.tasks import reraise_if_cancelling, stop_tasks
from services.rooms.api import RoomsApi, add_to_server
from services.rooms.app import Rooms, utcnow
from services.rooms.blocks import BlockCache
from services.rooms.clients import (
    IDENTITY_IDEMPOTENT,
    MEDIA_IDEMPOTENT,
    PAYMENTS_IDEMPOTENT,
    GrpcIdentity,
    GrpcMedia,
    GrpcPayments,
)
from services.rooms.live import LiveHub, LiveSettings, SpaceEventLog
from services.rooms.metrics import refresh_gauges
from services.rooms.settings import RoomsSettings
from services.rooms.store import PostgresSpaceStore
from services.rooms.watching import Watching

logger = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "SCHEMA", "SERVICE_NAME", "RoomsRuntime", "build_service", "main"]

SERVICE_NAME = "rooms"
SCHEMA = "rooms"
MIGRATIONS = Path(__file__).parent / "migrations"
IDEMPOTENCY_TTL = timedelta(days=1)


@dataclass
class _Channels:
    identity: grpc.aio.Channel
    payments: grpc.aio.Channel
    media: grpc.aio.Channel

    async def close(self) -> None:
        for channel in (self.identity, self.payments, self.media):
            await channel.close(None)


class RoomsRuntime:
    """What rooms opens at start-up and closes at shut-down.

    :param settings: rooms settings.
    :param common: shared settings (database, Redis, addresses, internal secret).
    :param grants: media grant secret and lifetime.
    :param live: live event settings.
    """

    def __init__(
        self,
        settings: RoomsSettings,
        common: CommonSettings,
        grants: MediaGrantSettings,
        live: LiveSettings,
    ) -> None:
        self.settings = settings
        self.common = common
        self.grant_settings = grants
        self.live_settings = live
        self.api = RoomsApi()
        self.pool: Pool | None = None
        self.redis: redis.asyncio.Redis | None = None
        self.rooms: Rooms | None = None
        self.event_log: SpaceEventLog | None = None
        self.hub: LiveHub | None = None
        self._channels: _Channels | None = None
        self._relay: OutboxRelay | None = None
        self._identity_events: StreamConsumer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None
        self.blocks: BlockCache | None = None

    def _link_key(self) -> bytes:
        if self.settings.join_link_secret is not None:
            return self.settings.join_link_secret.get_secret_value().encode()
        if self.common.internal_secret is None:
            raise RuntimeError("rooms needs ROOMS_JOIN_LINK_SECRET or SPACES_INTERNAL_SECRET")
        # Derived, so one secret fewer to manage; a different purpose than service tokens.
        base = self.common.internal_secret.get_secret_value().encode()
        return hashlib.sha256(b"rooms-join-links:" + base).digest()

    async def start(self) -> None:
        """Open everything; raises when a dependency cannot be reached."""
        url = self.common.database_url
        if not url:
            raise RuntimeError("rooms needs SPACES_DATABASE_URL")
        if self.grant_settings.secret is None:
            raise RuntimeError("rooms needs SPACES_MEDIA_GRANT_SECRET to issue media grants")
        if self.common.internal_secret is None:
            raise RuntimeError("rooms needs SPACES_INTERNAL_SECRET to call other services")
        applied = await migrate(url, SCHEMA, MIGRATIONS)
        if applied:
            logger.info("applied %d migrations to schema %s", len(applied), SCHEMA)
        self.pool = await create_pool(
            url,
            SCHEMA,
            min_size=self.settings.db_pool_min_size,
            max_size=self.settings.db_pool_max_size,
        )
        self.redis = create_redis(self.common.redis_url)
        await self.redis.ping()
        issuer = ServiceTokenIssuer(SERVICE_NAME, self.common.internal_secret)
        self._channels = _Channels(
            identity=create_channel(
                self.common.identity_addr,
                idempotent_methods=IDENTITY_IDEMPOTENT,
                token_issuer=issuer,
            ),
            payments=create_channel(
                self.common.payments_addr,
                idempotent_methods=PAYMENTS_IDEMPOTENT,
                token_issuer=issuer,
            ),
            media=create_channel(
                self.common.media_addr,
                idempotent_methods=MEDIA_IDEMPOTENT,
                token_issuer=issuer,
            ),
        )
        self.event_log = SpaceEventLog(self.pool, self.redis, self.live_settings, conninfo=url)
        await self.event_log.start()
        self.hub = LiveHub(self.pool, self.redis, self.live_settings, event_log=self.event_log)
        await self.hub.start()
        secret = self.grant_settings.secret
        store = PostgresSpaceStore(self.pool)
        identity = GrpcIdentity(self._channels.identity, issuer)
        self.blocks = BlockCache(
            identity,
            self.redis,
            ttl_s=self.settings.block_cache_ttl_s,
            max_size=self.settings.block_cache_size,
        )
        await self.blocks.start()
        self.rooms = Rooms(
            store=store,
            events=self.event_log,
            identity=identity,
            payments=GrpcPayments(self._channels.payments),
            media=GrpcMedia(self._channels.media),
            grants=MediaGrantSigner(secret, ttl=timedelta(seconds=self.grant_settings.ttl_s)),
            redis=self.redis,
            settings=self.settings,
            link_key=self._link_key(),
            blocks=self.blocks,
        )
        watching = Watching(store, self.hub, MediaGrantVerifier(secret))
        self.api.attach(self.rooms, watching)
        self._relay = OutboxRelay(url, SCHEMA, self.redis, SERVICE_NAME)
        self._relay.start()
        self._identity_events = StreamConsumer(
            self.redis,
            stream_name("identity"),
            SERVICE_NAME,
            self.settings.consumer_name,
            self.rooms.on_identity_event,
            block_ms=500,
        )
        self._identity_events.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="rooms sweeper")
        self._gauges = asyncio.create_task(self._observe_forever(), name="rooms gauges")

    async def stop(self) -> None:
        """Close what :meth:`start` opened, in reverse order (also after a partial start)."""
        if self._sweeper is not None:
            await stop_tasks([self._sweeper])
            self._sweeper = None
        if self._gauges is not None:
            await stop_tasks([self._gauges])
            self._gauges = None
        if self.blocks is not None:
            await self.blocks.stop()
            self.blocks = None
        if self._identity_events is not None:
            await self._identity_events.stop()
            self._identity_events = None
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None
        if self.rooms is not None:
            await self.rooms.aclose()
        if self.hub is not None:
            await self.hub.stop()
            self.hub = None
        if self.event_log is not None:
            await self.event_log.stop()
            self.event_log = None
        if self._channels is not None:
            await self._channels.close()
            self._channels = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def refresh_gauges(self) -> None:
        """Read the deployment's live Spaces and participants by role into the gauges."""
        if self.pool is not None:
            await refresh_gauges(PostgresSpaceStore(self.pool))

    async def _observe_forever(self) -> None:
        while True:
            try:
                await self.refresh_gauges()
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelling()
                logger.warning("reading the rooms gauges failed; will try again", exc_info=True)
            await asyncio.sleep(self.settings.gauge_interval_s)

    async def _sweep_forever(self) -> None:
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                if self.rooms is not None:
                    await self.rooms.sweep()
                if self.pool is not None and loop.time() - last_purge > 3600:
                    last_purge = loop.time()
                    store = PostgresSpaceStore(self.pool)
                    async with store.transaction() as tx:
                        await tx.purge_idempotency(utcnow() - IDEMPOTENCY_TTL)
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelling()
                logger.exception("sweeping failed; will try again")


def build_service(
    settings: RoomsSettings,
    common: CommonSettings,
    *,
    grants: MediaGrantSettings | None = None,
    live: LiveSettings | None = None,
    jwks: JwksSource | None = None,
) -> tuple[Service, RoomsRuntime]:
    """Build the rooms server (not started) and the runtime its hooks open and close.

    :param jwks: identity's public keys; fetched from identity over gRPC by default.
    """
    runtime = RoomsRuntime(settings, common, grants or MediaGrantSettings(), live or LiveSettings())
    source: JwksSource
    if jwks is None:
        identity_keys = IdentityJwksSource.connect(common.identity_addr)
        source = identity_keys
    else:
        source = jwks
    service = Service(SERVICE_NAME, settings, common, jwks=source)
    service.add_servicer(
        pb.DESCRIPTOR.services_by_name["RoomsService"],
        runtime.api,
        add_to_server,
    )
    service.on_startup(runtime.start)
    service.on_shutdown(runtime.stop)
    if jwks is None:
        service.on_shutdown(identity_keys.close)
    return service, runtime


def main() -> None:
    """Run rooms until SIGTERM/SIGINT."""

    async def run() -> None:
        # Built inside the loop: the JWKS source opens a grpc.aio channel to identity.
        service, _ = build_service(RoomsSettings(), CommonSettings())
        await run_service(service)

    asyncio.run(run())


if __name__ == "__main__":
    main()
