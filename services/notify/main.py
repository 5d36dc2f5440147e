"""Wiring of the notify process: ``python -m services.notify.main``.

Start-up (before health turns SERVING): apply the migrations of schema ``notify``, open the
pool, Redis, the channel to identity and the HTTP client, then start the background work,
each in its own tasks so none can starve the others: one event consumer per stream, the
fan-out workers, the reminder loop and the delivery engine. Every replica runs the same;
consumer groups, leases and SKIP LOCKED keep them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc.aio
import httpx
import redis.asyncio
from spaces.notify.v1 import notify_service_pb2 as pb
from spaces.notify.v1 import notify_service_pb2_grpc as pb_grpc

from services.common.auth import JwksSource, ServiceTokenIssuer
from services.common.clients import create_channel
from services.common.db import Pool, create_pool
from services.common.events import StreamConsumer
from services.common.jwks_client import IdentityJwksSource
from services.common.migrations import migrate
from services.common.redis import create_redis
from services.common.server import Service, serve
from services.common.settings import CommonSettings
from services.notify.api import NotifyApi
from services.notify.consumer import EventHandler, build_consumers
from services.notify.fanout import FanoutWorker, IdentityDirectory
from services.notify.live import LiveHub
from services.notify.reminders import ReminderWorker
from services.notify.retention import RetentionPolicy, RetentionWorker
from services.notify.settings import NotifySettings
from services.notify.store import PostgresNotifyStore, RetentionStore
from services.notify.webhooks import AddressPolicy, DeliveryEngine, build_push_adapters

logger = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "SCHEMA", "SERVICE_NAME", "NotifyRuntime", "build_service", "main"]

SERVICE_NAME = "notify"
SCHEMA = "notify"
MIGRATIONS = Path(__file__).parent / "migrations"
IDENTITY_IDEMPOTENT = [
    "spaces.identity.v1.IdentityService/GetUser",
    "spaces.identity.v1.IdentityService/StreamFollowerIds",
    "spaces.identity.v1.IdentityService/StreamFollowingIds",
]


class NotifyRuntime:
    """What notify opens at start-up and closes at shut-down.

    :param settings: notify's settings.
    :param common: the shared settings (database, Redis, identity, internal secret).
    """

    def __init__(self, settings: NotifySettings, common: CommonSettings) -> None:
        self.settings = settings
        self.common = common
        self.policy = AddressPolicy(
            allow_private=settings.webhook_allow_private_addresses,
            allow_http=settings.webhook_allow_http,
        )
        self.api = NotifyApi(settings, self.policy)
        self.pool: Pool | None = None
        self.redis: redis.asyncio.Redis | None = None
        self.store: PostgresNotifyStore | None = None
        self.http: httpx.AsyncClient | None = None
        self._identity_channel: grpc.aio.Channel | None = None
        self._consumers: list[StreamConsumer] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open everything and start the workers; raises when a dependency is unreachable."""
        settings, common = self.settings, self.common
        url = common.database_url
        if not url:
            raise RuntimeError("notify needs SPACES_DATABASE_URL")
        if common.internal_secret is None:
            raise RuntimeError("notify needs SPACES_INTERNAL_SECRET to call identity")
        applied = await migrate(url, SCHEMA, MIGRATIONS)
        if applied:
            logger.info("applied %d migrations to schema %s", len(applied), SCHEMA)
        self.pool = await create_pool(
            url, SCHEMA, min_size=settings.db_pool_min_size, max_size=settings.db_pool_max_size
        )
        self.redis = create_redis(common.redis_url)
        await self.redis.ping()
        # Redirects are refused by every request too; no environment proxies for webhooks.
        self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        adapters = build_push_adapters(settings, self.http, self.policy)
        enabled = [platform for platform, adapter in adapters.items() if adapter.enabled]
        self.store = PostgresNotifyStore(self.pool, enabled)
        hub = LiveHub(self.redis)
        self.api.attach(self.store, hub)
        issuer = ServiceTokenIssuer(SERVICE_NAME, common.internal_secret)
        channel = create_channel(
            common.identity_addr,
            idempotent_methods=IDENTITY_IDEMPOTENT,
            token_issuer=issuer,
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
        )
        self._identity_channel = channel
        directory = IdentityDirectory(channel, issuer)
        handler = EventHandler(
            self.store,
            hub,
            reminder_lead=settings.reminder_lead,
            display_name=directory.display_name,
        )
        self._consumers = build_consumers(
            self.redis,
            handler,
            consumer_name=settings.consumer_name,
            claim_idle_ms=settings.event_claim_idle_ms,
            block_ms=settings.event_block_ms,
        )
        for consumer in self._consumers:
            await consumer.ensure_group()
            # Run in our own task rather than consumer.start(): see _cancel_until_done.
            self._spawn(consumer.run, "consumer")
        for number in range(settings.fanout_workers):
            worker = FanoutWorker(
                self.store,
                directory,
                hub,
                owner=f"{settings.consumer_name}/{number}",
                batch_size=settings.fanout_batch_size,
                slice_batches=settings.fanout_slice_batches,
                lease_s=settings.fanout_lease_s,
                writers=settings.fanout_writers,
                pause_s=settings.fanout_batch_pause_s,
                idle_poll_s=settings.fanout_idle_poll_s,
            )
            self._spawn(worker.run, f"fanout {number}")
        reminders = ReminderWorker(self.store, hub, poll_s=settings.reminder_poll_s)
        self._spawn(reminders.run, "reminders")
        engine = DeliveryEngine(self.store, self.http, self.policy, adapters, settings)
        self._spawn(engine.run, "deliveries")
        retention = RetentionWorker(
            RetentionStore(self.pool),
            RetentionPolicy(
                notifications=settings.retention_notifications,
                deliveries=settings.retention_deliveries,
                processed_events=settings.retention_processed_events,
                finished_work=settings.retention_finished_work,
            ),
            interval_s=settings.retention_interval_s,
            step_size=settings.retention_step_size,
        )
        self._spawn(retention.run, "retention")

    def _spawn(self, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._tasks.append(asyncio.create_task(run(), name=f"notify {name}"))

    async def stop(self) -> None:
        """Stop the workers and close what :meth:`start` opened (also after a partial start)."""
        self._consumers = []
        await asyncio.gather(*(_cancel_until_done(task) for task in self._tasks))
        self._tasks = []
        if self._identity_channel is not None:
            await self._identity_channel.close(None)
            self._identity_channel = None
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


async def _cancel_until_done(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it really ends.

    A cancellation that lands inside a blocking Redis read can come out of redis-py as a
    connection error, which a worker's retry loop then swallows; cancelling again (the next
    one lands in the worker's pause) is what reliably stops it.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


def build_service(
    settings: NotifySettings, common: CommonSettings, *, jwks: JwksSource | None = None
) -> tuple[Service, NotifyRuntime]:
    """Build the notify server (not started) and the runtime its hooks open and close.

    :param jwks: where user-token keys come from; identity's GetJwks by default.
    """
    runtime = NotifyRuntime(settings, common)
    source: JwksSource
    if jwks is None:
        remote = IdentityJwksSource.connect(common.identity_addr)
        source = remote
    else:
        remote, source = None, jwks
    service = Service(SERVICE_NAME, settings, common, jwks=source)
    service.add_servicer(
        pb.DESCRIPTOR.services_by_name["NotifyService"],
        runtime.api,
        pb_grpc.add_NotifyServiceServicer_to_server,
    )
    service.on_startup(runtime.start)
    service.on_shutdown(runtime.stop)
    if remote is not None:
        service.on_shutdown(remote.close)
    return service, runtime


def main() -> None:
    """Run notify until SIGTERM/SIGINT."""
    service, _ = build_service(NotifySettings(), CommonSettings())
    serve(service)


if __name__ == "__main__":
    main()
