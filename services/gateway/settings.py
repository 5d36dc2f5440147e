"""Settings of the gateway process (env prefix ``GATEWAY_``).

Backend addresses come from the shared settings (``SPACES_<SVC>_ADDR``). A commented sample
of every variable is in ``.env.example``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.gateway.descriptors import DEFAULT_DESCRIPTOR_SET

logger = logging.getLogger(__name__)

__all__ = ["GatewaySettings"]


class GatewaySettings(BaseSettings):
    """Configuration of the HTTP/JSON + WebSocket gateway."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_file=".env", extra="ignore", frozen=True
    )

    http_host: str = Field(default="0.0.0.0", description="Bind address. Default: 0.0.0.0.")
    http_port: int = Field(
        default=8080, ge=0, le=65535, description="HTTP port; 0 picks a free one. Default: 8080."
    )
    metrics_port: int | None = Field(
        default=9106,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; unset disables it. Default: 9106.",
    )
    descriptor_set: Path = Field(
        default=DEFAULT_DESCRIPTOR_SET,
        description="Descriptor set the routes come from. Default: build/spaces.binpb.",
    )
    default_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Deadline of unary backend calls; X-Request-Timeout may only shorten it. Default: 10."
        ),
    )
    stream_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Deadline of server-streaming calls (WebSocket, NDJSON); unset: none, the stream "
            "lives as long as the client stays. Default: unset."
        ),
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Largest request body accepted; beyond it 413. Default: 1048576 (1 MiB).",
    )
    rate_limit_per_s: float = Field(
        default=20.0,
        gt=0,
        description="Requests per second each client (user or IP) is refilled. Default: 20.",
    )
    rate_limit_burst: int = Field(
        default=60,
        ge=1,
        description="Bucket size: requests a client may send at once. Default: 60.",
    )
    redis_url: str | None = Field(
        default=None,
        description=(
            "Redis/Valkey URL of the rate-limit buckets, shared by every replica. Unset: "
            "SPACES_REDIS_URL if that is set, else buckets in this process (fine for one "
            "replica). Default: unset."
        ),
    )
    cors_allowed_origins: list[str] = Field(
        default_factory=list,
        description=(
            'Origins browsers may call from, JSON list, e.g. ["https://app.example"]; '
            "empty allows no cross-origin calls. Default: []."
        ),
    )
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        description=(
            "Comma-separated proxy addresses (or *) whose X-Forwarded-For is trusted for the "
            "client IP that anonymous rate limits go by; set it to the ingress's addresses "
            "behind a load balancer. Default: 127.0.0.1."
        ),
    )
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="Seconds open requests get on SIGTERM. Default: 10."
    )
