"""Wiring of the identity process: ``python -m services.identity.main``.

Start-up (before health turns SERVING): apply the migrations of schema ``identity``, open
the pool and Redis, load (or create) the signing keys, attach storage to the servicer and
start the background work: the outbox relay, the key check (rotation when due, reload so
replicas agree) and the hourly purge of expired refresh tokens and idempotency keys.

Identity verifies the access tokens it issued with its own key ring (the
:class:`~services.identity.signing.KeyManager` is its JwksSource), so it never calls itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from pathlib import Path

import redis.asyncio
from spaces.identity.v1 import identity_service_pb2 as pb
from spaces.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.common.auth import TokenVerifier
from services.common.db import Pool, create_pool
from services.common.migrations import migrate
from services.common.outbox import OutboxRelay
from services.common.redis import create_redis
from services.common.server import Service, serve
from services.common.settings import CommonSettings
from services.identity.api import IdentityApi
from services.identity.passwords import PasswordHasher
from services.identity.settings import IdentitySettings
from services.identity.signing import Clock, KeyManager, utc_now
from services.identity.store import PostgresIdentityStore
from services.identity.throttle import LoginThrottle

logger = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "SCHEMA", "SERVICE_NAME", "IdentityRuntime", "build_service", "main"]

SERVICE_NAME = "identity"
SCHEMA = "identity"
MIGRATIONS = Path(__file__).parent / "migrations"
# How long a CreateUser idempotency key is remembered (clients retry within minutes).
CREATE_REQUEST_TTL = dt.timedelta(days=7)
PURGE_INTERVAL_S = 3600.0


class IdentityRuntime:
    """What identity opens at start-up and closes at shut-down.

    :param settings: identity's settings.
    :param common: the shared settings (database, Redis, internal secret).
    :param clock: the time source.
    """

    def __init__(
        self, settings: IdentitySettings, common: CommonSettings, *, clock: Clock = utc_now
    ) -> None:
        self.settings = settings
        self.common = common
        self._clock = clock
        self.keys = KeyManager(
            token_ttl=settings.access_token_ttl,
            rotation_interval=settings.key_rotation_interval,
            prepublish_lead=settings.key_prepublish_lead,
            check_interval_s=settings.key_check_interval_s,
            encryption_secret=settings.key_encryption_secret,
            clock=clock,
        )
        self.hasher = PasswordHasher(
            time_cost=settings.password_time_cost,
            memory_cost_kib=settings.password_memory_kib,
            parallelism=settings.password_parallelism,
        )
        self.api = IdentityApi(settings, self.keys, self.hasher, clock=clock)
        self.pool: Pool | None = None
        self.store: PostgresIdentityStore | None = None
        self.redis: redis.asyncio.Redis | None = None
        self._relay: OutboxRelay | None = None
        self._purge: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open everything; raises when the database or Redis cannot be reached."""
        url = self.common.database_url
        if not url:
            raise RuntimeError("identity needs SPACES_DATABASE_URL")
        applied = await migrate(url, SCHEMA, MIGRATIONS)
        if applied:
            logger.info("applied %d migrations to schema %s", len(applied), SCHEMA)
        self.pool = await create_pool(
            url,
            SCHEMA,
            min_size=self.settings.db_pool_min_size,
            max_size=self.settings.db_pool_max_size,
        )
        self.store = PostgresIdentityStore(self.pool)
        self.redis = create_redis(self.common.redis_url)
        await self.redis.ping()  # fail the start-up now rather than the first log-in
        await self.keys.start(self.store)
        throttle = LoginThrottle(
            self.redis,
            max_failures_per_handle=self.settings.login_max_failures_per_handle,
            max_failures_per_client=self.settings.login_max_failures_per_client,
            window=self.settings.login_failure_window,
        )
        self.api.attach(self.store, throttle)
        self._relay = OutboxRelay(url, SCHEMA, self.redis, SERVICE_NAME)
        self._relay.start()
        self._purge = asyncio.create_task(self._purge_forever(), name="identity purge")

    async def stop(self) -> None:
        """Close what :meth:`start` opened, in reverse order (also after a partial start)."""
        if self._purge is not None:
            self._purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge
            self._purge = None
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None
        await self.keys.stop()
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def _purge_forever(self) -> None:
        while True:
            try:
                if self.store is not None:
                    deleted = await self.store.purge(self._clock(), CREATE_REQUEST_TTL)
                    if deleted:
                        logger.info("purged %d expired tokens and idempotency keys", deleted)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("purging expired rows failed; will try again")
            await asyncio.sleep(PURGE_INTERVAL_S)


def build_service(
    settings: IdentitySettings, common: CommonSettings, *, clock: Clock = utc_now
) -> tuple[Service, IdentityRuntime]:
    """Build the identity server (not started) and the runtime its hooks open and close."""
    runtime = IdentityRuntime(settings, common, clock=clock)
    # The key ring is local, so the verifier may look at it often and on every unknown
    # kid, instead of the caching a remote JWKS needs.
    verifier = TokenVerifier(
        runtime.keys, common.internal_secret, cache_ttl_s=5.0, min_refresh_interval_s=0.0
    )
    service = Service(SERVICE_NAME, settings, common, jwks=runtime.keys, verifier=verifier)
    service.add_servicer(
        pb.DESCRIPTOR.services_by_name["IdentityService"],
        runtime.api,
        pb_grpc.add_IdentityServiceServicer_to_server,
    )
    service.on_startup(runtime.start)
    service.on_shutdown(runtime.stop)
    return service, runtime


def main() -> None:
    """Run identity until SIGTERM/SIGINT."""
    service, _ = build_service(IdentitySettings(), CommonSettings())
    serve(service)


if __name__ == "__main__":
    main()
