"""Notify's own settings (env prefix ``NOTIFY_``); the shared ones are ``SPACES_``.

Every field documents its default; ``services/notify/README.md`` has a commented sample.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

logger = logging.getLogger(__name__)

__all__ = ["NotifySettings"]


class NotifySettings(ServiceSettings):
    """Configuration of the notify process (env prefix ``NOTIFY_``)."""

    model_config = SettingsConfigDict(
        env_prefix="NOTIFY_", env_file=".env", extra="ignore", frozen=True
    )

    grpc_port: int = Field(default=50054, ge=0, le=65535, description="gRPC port. Default: 50054.")
    metrics_port: int | None = Field(
        default=9104,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; unset disables it. Default: 9104.",
    )
    consumer_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description=(
            "This replica's name in the event consumer groups and on fan-out leases; unique "
            "per replica and stable across its restarts (the pod name). Default: the host name."
        ),
    )

    # -- events ------------------------------------------------------------------------
    event_claim_idle_ms: int = Field(
        default=30_000,
        ge=100,
        description=(
            "Stream entries left pending this long by a crashed consumer are taken over. "
            "Default: 30000."
        ),
    )
    event_block_ms: int = Field(
        default=1000, ge=10, description="Longest wait of one stream read. Default: 1000."
    )

    # -- fan-out -----------------------------------------------------------------------
    fanout_workers: int = Field(
        default=2, ge=1, description="Fan-out jobs processed at once per replica. Default: 2."
    )
    fanout_batch_size: int = Field(
        default=10_000,
        ge=1,
        le=10_000,
        description="Followers per StreamFollowerIds batch and per insert. Default: 10000.",
    )
    fanout_writers: int = Field(
        default=2,
        ge=1,
        le=8,
        description=(
            "Batches of one fan-out written at once, each in its own transaction on its own "
            "connection (the database then uses more than one core). Default: 2."
        ),
    )
    fanout_slice_batches: int = Field(
        default=25,
        ge=1,
        description=(
            "Batches a worker writes before it hands the job back, so several big fan-outs "
            "take turns. Default: 25."
        ),
    )
    fanout_lease_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "A job whose replica stops renewing its lease is resumed by another after this "
            "many seconds. Default: 30."
        ),
    )
    fanout_batch_pause_s: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Pause after each batch, to leave database capacity to other work. Default: 0."
        ),
    )
    fanout_idle_poll_s: float = Field(
        default=0.2, gt=0, description="How often an idle worker looks for jobs. Default: 0.2."
    )

    # -- reminders ---------------------------------------------------------------------
    reminder_lead: timedelta = Field(
        default=timedelta(minutes=10),
        ge=timedelta(0),
        description=(
            "How long before a scheduled start people who pressed 'remind me' are reminded "
            "(the host is reminded at the start). Default: 10 minutes."
        ),
    )
    reminder_poll_s: float = Field(
        default=0.2,
        gt=0,
        le=1.0,
        description="Longest sleep of the reminder loop (bounds lateness). Default: 0.2.",
    )

    # -- deliveries --------------------------------------------------------------------
    delivery_concurrency: int = Field(
        default=16, ge=1, description="Webhook/push attempts in flight per replica. Default: 16."
    )
    delivery_poll_s: float = Field(
        default=0.2, gt=0, description="How often idle delivery workers look for work."
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="Time a receiver has to answer. Default: 10."
    )
    webhook_max_attempts: int = Field(
        default=12,
        ge=1,
        description=(
            "Attempts before a delivery is dead-lettered. With the default backoff this "
            "spans about 24 hours. Default: 12."
        ),
    )
    webhook_backoff_base_s: float = Field(
        default=30.0, gt=0, description="Delay before the first retry (doubles). Default: 30."
    )
    webhook_backoff_cap_s: float = Field(
        default=6 * 3600.0, gt=0, description="Longest delay between retries. Default: 6 h."
    )
    webhook_disable_after_failures: int = Field(
        default=100,
        ge=1,
        description=(
            "Failed attempts in a row (any of the webhook's deliveries) after which a "
            "webhook is disabled: its queued deliveries are dead-lettered, its owner gets a "
            "WEBHOOK_DISABLED notification, and EnableWebhook turns it back on. A success "
            "resets the count. Default: 100."
        ),
    )
    webhook_allow_private_addresses: bool = Field(
        default=False,
        description=(
            "Allow webhook URLs resolving to loopback/private/link-local addresses. Only for "
            "tests and closed networks: it lets users make notify call internal services. "
            "Default: false."
        ),
    )
    webhook_allow_http: bool = Field(
        default=False,
        description="Allow plain http:// webhook URLs (https only by default). Default: false.",
    )
    webhook_limit: int = Field(default=10, ge=1, description="Webhooks per user. Default: 10.")
    device_limit: int = Field(default=20, ge=1, description="Devices per user. Default: 20.")

    # -- push adapters (all off: they need the internet and credentials) ---------------
    fcm_project_id: str = Field(
        default="", description="Firebase project id; with fcm_access_token enables FCM."
    )
    fcm_access_token: SecretStr | None = Field(
        default=None, description="OAuth2 access token for the FCM HTTP v1 API. Default: unset."
    )
    fcm_endpoint: str = Field(
        default="https://fcm.googleapis.com",
        pattern=r"^https?://",
        description=(
            "Base URL of the FCM HTTP v1 API (an egress proxy; tests point it at a local "
            "server). Default: https://fcm.googleapis.com."
        ),
    )
    webpush_vapid_private_key: SecretStr | None = Field(
        default=None,
        description="VAPID private key (PEM, P-256) enabling Web Push. Default: unset.",
    )
    webpush_vapid_subject: str = Field(
        default="mailto:ops@example.invalid", description="VAPID 'sub' claim (mailto: or URL)."
    )
    apns_enabled: bool = Field(
        default=False,
        description=(
            "APNs needs HTTP/2 (the 'h2' package) and a signing key; not available in this "
            "build, so enabling it only logs why it stays off. Default: false."
        ),
    )

    # -- retention ---------------------------------------------------------------------
    retention_interval_s: float = Field(
        default=3600.0, gt=0, description="Time between retention purges. Default: 3600."
    )
    retention_step_size: int = Field(
        default=5000,
        ge=1,
        description="Rows deleted per purge transaction (keeps locks short). Default: 5000.",
    )
    retention_notifications: timedelta = Field(
        default=timedelta(days=90),
        gt=timedelta(0),
        description="How long inbox notifications are kept. Default: 90 days.",
    )
    retention_deliveries: timedelta = Field(
        default=timedelta(days=14),
        gt=timedelta(0),
        description=(
            "How long succeeded and dead-lettered deliveries are kept (ListWebhookDeliveries "
            "shows 7 days). Default: 14 days."
        ),
    )
    retention_processed_events: timedelta = Field(
        default=timedelta(days=7),
        gt=timedelta(0),
        description=(
            "How long consumed event ids are kept to drop redeliveries; must exceed how "
            "long an event stays in the streams. Default: 7 days."
        ),
    )
    retention_finished_work: timedelta = Field(
        default=timedelta(days=30),
        gt=timedelta(0),
        description=(
            "How long finished fan-out jobs and sent or canceled reminders are kept. "
            "Default: 30 days."
        ),
    )

    # -- database ----------------------------------------------------------------------
    db_pool_min_size: int = Field(default=2, ge=0, description="Pooled connections kept open.")
    db_pool_max_size: int = Field(default=12, ge=1, description="Most pooled connections.")

    @model_validator(mode="after")
    def _check(self) -> NotifySettings:
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("db_pool_min_size must not exceed db_pool_max_size")
        if self.webhook_backoff_base_s > self.webhook_backoff_cap_s:
            raise ValueError("webhook_backoff_base_s must not exceed webhook_backoff_cap_s")
        if self.retention_notifications < self.retention_deliveries:
            # A queued delivery needs its notification until it is finished.
            raise ValueError("retention_notifications must be at least retention_deliveries")
        return self
