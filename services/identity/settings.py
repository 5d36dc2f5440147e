"""Identity's own settings (env prefix ``IDENTITY_``); the shared ones are ``SPACES_``.

Every field documents its default; ``services/identity/README.md`` has a commented sample.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

logger = logging.getLogger(__name__)

__all__ = ["IdentitySettings"]


class IdentitySettings(ServiceSettings):
    """Configuration of the identity process (env prefix ``IDENTITY_``)."""

    model_config = SettingsConfigDict(
        env_prefix="IDENTITY_", env_file=".env", extra="ignore", frozen=True
    )

    grpc_port: int = Field(default=50051, ge=0, le=65535, description="gRPC port. Default: 50051.")
    metrics_port: int | None = Field(
        default=9101,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; unset disables it. Default: 9101.",
    )

    # -- host policy -------------------------------------------------------------------
    host_min_followers: int = Field(
        default=0,
        ge=0,
        description=(
            "Followers a user needs to host a Space. 0 lets everyone host (the current "
            "product rule); 600 reproduces the early Twitter Spaces rule. Default: 0."
        ),
    )
    max_following: int = Field(
        default=5000,
        ge=1,
        description="Most users one account may follow (FOLLOW_LIMIT_REACHED). Default: 5000.",
    )

    # -- tokens and keys ---------------------------------------------------------------
    access_token_ttl: timedelta = Field(
        default=timedelta(minutes=15),
        gt=timedelta(0),
        description="Lifetime of an access token (ISO 8601, e.g. PT15M). Default: 15 minutes.",
    )
    refresh_token_ttl: timedelta = Field(
        default=timedelta(days=30),
        gt=timedelta(0),
        description=(
            "Lifetime of a refresh-token family from its log-in; rotation does not extend "
            "it. Default: 30 days."
        ),
    )
    key_rotation_interval: timedelta = Field(
        default=timedelta(days=30),
        gt=timedelta(0),
        description="How long one signing key signs before the next takes over. Default: 30 days.",
    )
    key_prepublish_lead: timedelta = Field(
        default=timedelta(hours=2),
        ge=timedelta(0),
        description=(
            "How long a new signing key is published in the JWKS before it starts signing, "
            "so every service has it cached by then (they cache the JWKS for up to an hour). "
            "Default: 2 hours."
        ),
    )
    key_check_interval_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "How often each replica reloads the signing keys from the database (and "
            "rotates them when due), so replicas agree on the key set. Default: 60."
        ),
    )
    key_encryption_secret: SecretStr | None = Field(
        default=None,
        description=(
            "Passphrase the private signing keys are encrypted with in the database "
            "(PKCS#8, best available encryption). Default: unset (stored unencrypted; set "
            "it in production)."
        ),
    )

    # -- passwords ---------------------------------------------------------------------
    password_time_cost: int = Field(
        default=2, ge=1, description="Argon2id iterations per hash. Default: 2."
    )
    password_memory_kib: int = Field(
        default=19 * 1024,
        ge=8,
        description="Argon2id memory per hash in KiB. Default: 19456 (19 MiB, OWASP minimum).",
    )
    password_parallelism: int = Field(
        default=1, ge=1, description="Argon2id lanes per hash. Default: 1."
    )

    # -- log-in throttling -------------------------------------------------------------
    login_max_failures_per_handle: int = Field(
        default=10,
        ge=1,
        description=(
            "Failed log-ins allowed for one handle per window before further attempts get "
            "TOO_MANY_LOGIN_ATTEMPTS. Default: 10."
        ),
    )
    login_max_failures_per_client: int = Field(
        default=100,
        ge=1,
        description=(
            "Failed log-ins allowed from one client address per window (all handles) "
            "before it gets RATE_LIMITED. Default: 100."
        ),
    )
    login_failure_window: timedelta = Field(
        default=timedelta(minutes=15),
        gt=timedelta(0),
        description="Length of the fixed window failures are counted in. Default: 15 minutes.",
    )

    # -- database ----------------------------------------------------------------------
    db_pool_min_size: int = Field(default=1, ge=0, description="Pooled connections kept open.")
    db_pool_max_size: int = Field(default=10, ge=1, description="Most pooled connections.")

    @model_validator(mode="after")
    def _check(self) -> IdentitySettings:
        if self.key_prepublish_lead >= self.key_rotation_interval:
            raise ValueError("key_prepublish_lead must be shorter than key_rotation_interval")
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("db_pool_min_size must not exceed db_pool_max_size")
        return self
