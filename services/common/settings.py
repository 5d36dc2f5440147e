"""Settings shared by every service, and the base class for per-service settings.

Everything is read from the environment (and an optional ``.env`` file in the working
directory) by pydantic-settings. Shared settings use the ``SPACES_`` prefix; each service
subclasses :class:`ServiceSettings` with its own prefix (``IDENTITY_``, ``ROOMS_``, ...), so one
environment can hold the configuration of every process that ``make up`` starts.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

__all__ = ["CommonSettings", "ServiceSettings"]


class CommonSettings(BaseSettings):
    """Configuration every Spaces process shares (env prefix ``SPACES_``)."""

    model_config = SettingsConfigDict(
        env_prefix="SPACES_", env_file=".env", extra="ignore", frozen=True
    )

    database_url: str | None = Field(
        default=None,
        description=(
            "libpq connection URI or DSN of PostgreSQL, e.g. "
            "postgresql://spaces:secret@db:5432/spaces. Default: unset (no database; "
            "services that need one refuse to start)."
        ),
    )
    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="Redis/Valkey URL (redis://, rediss:// or unix://). Default: redis://localhost:6379/0.",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description=(
            "OTLP/gRPC endpoint traces are exported to, e.g. http://otel-collector:4317. "
            "Default: unset (spans are created for context propagation but never exported)."
        ),
    )
    log_level: str = Field(default="INFO", description="Root log level. Default: INFO.")
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="json (one object a line, for collectors) or text (humans). Default: json.",
    )
    internal_secret: SecretStr | None = Field(
        default=None,
        description=(
            "HMAC key (at least 32 random bytes) for short-lived service-to-service tokens. "
            "Default: unset (service tokens can neither be issued nor accepted)."
        ),
    )
    identity_addr: str = Field(
        default="localhost:50051", description="identity gRPC target. Default: localhost:50051."
    )
    rooms_addr: str = Field(
        default="localhost:50052", description="rooms gRPC target. Default: localhost:50052."
    )
    media_addr: str = Field(
        default="localhost:50053", description="media gRPC target. Default: localhost:50053."
    )
    notify_addr: str = Field(
        default="localhost:50054", description="notify gRPC target. Default: localhost:50054."
    )
    payments_addr: str = Field(
        default="localhost:50055", description="payments gRPC target. Default: localhost:50055."
    )


class ServiceSettings(BaseSettings):
    """Base class of the settings one service process has for itself.

    Subclass it with the service's own prefix and defaults (pydantic merges the subclass's
    ``model_config`` into this one), for example::

        class IdentitySettings(ServiceSettings):
            model_config = SettingsConfigDict(env_prefix="IDENTITY_")
            grpc_port: int = 50051  # IDENTITY_GRPC_PORT
            metrics_port: int | None = 9101  # IDENTITY_METRICS_PORT
    """

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    grpc_host: str = Field(
        default="0.0.0.0",
        description="Address the gRPC server binds. Default: 0.0.0.0 (all IPv4 interfaces).",
    )
    grpc_port: int = Field(
        default=50051,
        ge=0,
        le=65535,
        description="gRPC port; 0 picks a free one (tests). Default: 50051.",
    )
    metrics_port: int | None = Field(
        default=9100,
        ge=0,
        le=65535,
        description=(
            "Port of the Prometheus /metrics HTTP server; 0 picks a free one, unset disables "
            "it. Default: 9100."
        ),
    )
    max_connection_age_s: float | None = Field(
        default=300.0,
        gt=0,
        description=(
            "Seconds (give or take a tenth, at random) after which the server asks a client "
            "to open a new connection (HTTP/2 GOAWAY); calls in flight, streams too, finish "
            "on the old one. Reconnecting, a client resolves the service's name again, so "
            "calls spread over replicas started since (the chart's headless Services). "
            "Unset: never. Default: 300."
        ),
    )
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        description=(
            "Seconds in-flight RPCs get to finish after SIGTERM before they are cancelled. "
            "Keep it below the pod's terminationGracePeriodSeconds. Default: 10."
        ),
    )
