"""Payments' own settings (env prefix ``PAYMENTS_``); the shared ones are ``SPACES_``.

Every field documents its default; ``services/payments/README.md`` has a commented sample.
"""

from __future__ import annotations

import logging
import socket

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

logger = logging.getLogger(__name__)

__all__ = ["PaymentsSettings"]


class PaymentsSettings(ServiceSettings):
    """Configuration of the payments process (env prefix ``PAYMENTS_``)."""

    model_config = SettingsConfigDict(
        env_prefix="PAYMENTS_", env_file=".env", extra="ignore", frozen=True
    )

    grpc_port: int = Field(default=50055, ge=0, le=65535, description="gRPC port. Default: 50055.")
    metrics_port: int | None = Field(
        default=9105,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; unset disables it. Default: 9105.",
    )

    # -- money -------------------------------------------------------------------------
    platform_fee_bps: int = Field(
        default=1000,
        ge=0,
        le=10_000,
        description=(
            "Platform fee in basis points (1/100 of a percent) of each ticket and tip; the "
            "fee is rounded half up to a whole minor unit. Default: 1000 (10 %)."
        ),
    )
    tip_min_minor: int = Field(
        default=100,
        ge=100,
        le=50_000,
        description="Smallest tip in minor units (the API allows 100 to 50000). Default: 100.",
    )
    tip_max_minor: int = Field(
        default=50_000,
        ge=100,
        le=50_000,
        description="Largest tip in minor units (the API allows 100 to 50000). Default: 50000.",
    )
    idempotency_retention_s: float = Field(
        default=48 * 3600.0,
        ge=24 * 3600.0,
        description="How long idempotency keys are kept (at least 24 h). Default: 48 h.",
    )
    idempotency_lease_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "How long a request holds its idempotency key while it runs; a repeat arriving "
            "later takes over (a crashed request is resumed). Default: 30."
        ),
    )

    # -- processor ---------------------------------------------------------------------
    processor: str = Field(
        default="sandbox",
        description="Card processor: only 'sandbox' (never moves real money) is built in.",
    )
    processor_timeout_s: float = Field(
        default=5.0, gt=0, description="Longest wait for one processor call. Default: 5."
    )
    sandbox_latency_ms: int = Field(
        default=0,
        ge=0,
        description="Delay the sandbox adds to every call, to act like a network. Default: 0.",
    )
    sandbox_timeout_s: float = Field(
        default=0.2,
        ge=0,
        description="How long the sandbox's timeout test cards hang before failing. Default: 0.2.",
    )

    # -- workers -----------------------------------------------------------------------
    worker_interval_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Period of the background worker: payouts, stale reservations, refunds of "
            "canceled Spaces, the ledger check, expired idempotency keys. Default: 1."
        ),
    )
    ledger_check_interval_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "How often the worker re-proves the whole ledger (a full scan) and updates the "
            "spaces_payments_ledger_imbalance gauge. Default: 60."
        ),
    )
    reservation_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "A seat reserved this long ago whose purchase never finished is reconciled "
            "with the processor (ticket issued, or seat released). Default: 60."
        ),
    )
    refund_batch_size: int = Field(
        default=100, ge=1, le=1000, description="Tickets refunded per batch. Default: 100."
    )

    # -- events --------------------------------------------------------------------------
    consumer_name: str = Field(
        default_factory=socket.gethostname,
        description="This replica's name in the 'payments' consumer group. Default: hostname.",
    )
    consumer_claim_idle_ms: int = Field(
        default=30_000,
        ge=100,
        description=(
            "Events another (crashed) consumer left unacknowledged this long are taken "
            "over. Default: 30000."
        ),
    )
    consume_events: bool = Field(
        default=True, description="Consume rooms' event stream. Default: true."
    )
    visibility_check: bool = Field(
        default=True,
        description=(
            "Ask rooms whether a user may see a Space before showing or selling anything of "
            "it (offerings, tickets, tips); a hidden Space is answered NOT_FOUND. Turn off "
            "only where no rooms runs (payments tested alone): every Space is then treated "
            "as visible. Default: true."
        ),
    )

    # -- auth ----------------------------------------------------------------------------
    jwks_json: str | None = Field(
        default=None,
        description=(
            "A JWKS document trusted instead of fetching identity's (tests, offline dev). "
            "Default: unset (keys come from identity's GetJwks)."
        ),
    )

    # -- database ----------------------------------------------------------------------
    db_pool_min_size: int = Field(default=2, ge=0, description="Pooled connections kept open.")
    db_pool_max_size: int = Field(default=20, ge=1, description="Most pooled connections.")

    @model_validator(mode="after")
    def _check(self) -> PaymentsSettings:
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("db_pool_min_size must not exceed db_pool_max_size")
        if self.tip_min_minor > self.tip_max_minor:
            raise ValueError("tip_min_minor must not exceed tip_max_minor")
        if self.processor != "sandbox":
            raise ValueError("the only built-in processor is 'sandbox'")
        return self
