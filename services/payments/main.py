"""The payments process: ``python -m services.payments.main``.

Wiring only: migrations of schema ``payments``, the pool, the sandbox processor, the use
cases and their servicer, the outbox relay (to ``spaces:events:payments``), the consumer
of rooms' events (group ``payments``) and the background worker. Settings come from the
environment (``PAYMENTS_*`` and the shared ``SPACES_*``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path

import redis.asyncio
from spaces.payments.v1 import payments_service_pb2 as pb
from spaces.payments.v1 import payments_service_pb2_grpc as pb_grpc

from services.common.auth import JwksSource, ServiceTokenIssuer, StaticJwksSource
from services.common.db import Pool, create_pool
from services.common.events import StreamConsumer, stream_name
from services.common.jwks_client import IdentityJwksSource
from services.common.logs import configure_logging
from services.common.migrations import migrate
from services.common.outbox import OutboxRelay
from services.common.redis import create_redis
from services.common.server import Service, run_service
from services.common.settings import CommonSettings
from services.payments.api import PaymentsApi
from services.payments.events import ROOMS_STREAM_GROUP, RoomsEventHandler
from services.payments.flows import Payments, PaymentsConfig
from services.payments.processor import SandboxCardProcessor
from services.payments.settings import PaymentsSettings
from services.payments.stage import RoomsStageDirectory, StageDirectory, StaticStageDirectory
from services.payments.store import PostgresPaymentsStore
from services.payments.workers import PaymentsWorker

logger = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "SCHEMA", "PaymentsApp", "create_app", "main"]

SCHEMA = "payments"
MIGRATIONS = Path(__file__).parent / "migrations"


@dataclasses.dataclass
class PaymentsApp:
    """Everything one payments process runs, for ``main`` and for tests."""

    service: Service
    payments: Payments
    store: PostgresPaymentsStore
    processor: SandboxCardProcessor
    pool: Pool
    redis: redis.asyncio.Redis
    relay: OutboxRelay
    consumer: StreamConsumer | None
    worker: PaymentsWorker


async def create_app(
    settings: PaymentsSettings,
    common: CommonSettings,
    *,
    jwks: JwksSource | None = None,
    stage: StageDirectory | None = None,
    start_worker: bool = True,
) -> PaymentsApp:
    """Migrate the schema, open the pool and wire the service (not started yet).

    :param jwks: token keys; default: ``settings.jwks_json``, else identity's GetJwks.
    :param stage: who is on stage; default: rooms' GetParticipant.
    :param start_worker: run the background worker (tests drive it by hand when off).
    """
    url = common.database_url
    if not url:
        raise RuntimeError("payments needs a database: set SPACES_DATABASE_URL")
    await migrate(url, SCHEMA, MIGRATIONS)
    pool = await create_pool(
        url, SCHEMA, min_size=settings.db_pool_min_size, max_size=settings.db_pool_max_size
    )
    client = create_redis(common.redis_url)
    store = PostgresPaymentsStore(pool)
    processor = SandboxCardProcessor(
        pool,
        latency_s=settings.sandbox_latency_ms / 1000,
        timeout_s=settings.sandbox_timeout_s,
    )
    secret = common.internal_secret
    issuer = ServiceTokenIssuer("payments", secret) if secret is not None else None
    if stage is None:
        if issuer is not None:
            stage = RoomsStageDirectory(
                common.rooms_addr, issuer, check_visibility=settings.visibility_check
            )
        else:
            logger.warning("no internal secret: tips go to the host only")
            stage = StaticStageDirectory()
    payments = Payments(
        store,
        processor,
        stage,
        PaymentsConfig(
            fee_bps=settings.platform_fee_bps,
            lease_s=settings.idempotency_lease_s,
            processor_timeout_s=settings.processor_timeout_s,
            tip_min_minor=settings.tip_min_minor,
            tip_max_minor=settings.tip_max_minor,
        ),
    )
    if jwks is None:
        jwks = (
            StaticJwksSource(json.loads(settings.jwks_json))
            if settings.jwks_json
            else IdentityJwksSource.connect(common.identity_addr)
        )
    service = Service("payments", settings, common, jwks=jwks)
    service.add_servicer(
        pb.DESCRIPTOR.services_by_name["PaymentsService"],
        PaymentsApi(payments),
        pb_grpc.add_PaymentsServiceServicer_to_server,
    )
    relay = OutboxRelay(url, SCHEMA, client, "payments")
    consumer = (
        StreamConsumer(
            client,
            stream_name("rooms"),
            ROOMS_STREAM_GROUP,
            settings.consumer_name,
            RoomsEventHandler(payments, refund_batch=settings.refund_batch_size),
            block_ms=500,
            claim_idle_ms=settings.consumer_claim_idle_ms,
        )
        if settings.consume_events
        else None
    )
    worker = PaymentsWorker(
        payments,
        interval_s=settings.worker_interval_s,
        reservation_timeout_s=settings.reservation_timeout_s,
        retention_s=settings.idempotency_retention_s,
        refund_batch=settings.refund_batch_size,
        ledger_check_interval_s=settings.ledger_check_interval_s,
    )
    app = PaymentsApp(service, payments, store, processor, pool, client, relay, consumer, worker)

    async def start_background() -> None:
        relay.start()
        if consumer is not None:
            await consumer.ensure_group()
            consumer.start()
        if start_worker:
            worker.start()

    async def stop_background() -> None:
        await worker.stop()
        if consumer is not None:
            await consumer.stop()
        await relay.stop()
        for closable in (stage, jwks):
            close = getattr(closable, "close", None)
            if close is not None:
                await close()
        await client.aclose()
        await pool.close()

    service.on_startup(start_background)
    service.on_shutdown(stop_background)
    return app


async def main() -> None:
    """Run payments until SIGTERM/SIGINT."""
    settings = PaymentsSettings()
    common = CommonSettings()
    configure_logging("payments", common)
    app = await create_app(settings, common)
    await run_service(app.service)


if __name__ == "__main__":
    asyncio.run(main())
