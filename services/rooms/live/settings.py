"""Settings of the live event machinery (env prefix ``ROOMS_LIVE_``)."""

from __future__ import annotations

import logging

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

__all__ = ["LiveSettings"]


class LiveSettings(BaseSettings):
    """How the ordered event log, the fan-out and the coalescers behave.

    Every rooms replica serving the same Spaces must use the same ``resume_token_secret``
    and ``schema``; the rest may differ per replica.
    """

    model_config = SettingsConfigDict(
        env_prefix="ROOMS_LIVE_", env_file=".env", extra="ignore", frozen=True
    )

    schema_name: str = Field(
        default="rooms",
        description="PostgreSQL schema holding space_events (the rooms schema). Default: rooms.",
    )
    resume_token_secret: SecretStr | None = Field(
        default=None,
        description=(
            "HMAC key binding resume tokens to their Space; shared by all replicas. Default: "
            "unset (a fixed key: tokens still cannot be moved between Spaces by accident, "
            "but anyone can mint one)."
        ),
    )
    resume_window_s: float = Field(
        default=60.0,
        gt=0,
        description="A watcher resuming within this many seconds misses nothing. Default: 60.",
    )
    retention_s: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Events are kept this long for resumes and gap repair (at least the resume "
            "window). Default: 600."
        ),
    )
    prune_interval_s: float = Field(
        default=30.0, gt=0, description="Seconds between prunes of old events. Default: 30."
    )
    reaction_window_s: float = Field(
        default=0.25,
        gt=0,
        description="Reactions are counted over windows this long, one event each. Default: 0.25.",
    )
    speaking_levels_interval_s: float = Field(
        default=0.25,
        gt=0,
        description="Least time between two speaking_levels events of a Space. Default: 0.25.",
    )
    stream_max_len: int = Field(
        default=2000,
        gt=0,
        description="Approximate cap of each Space's Redis fan-out stream. Default: 2000.",
    )
    stream_ttl_s: int = Field(
        default=3600,
        gt=0,
        description="A Space's fan-out stream expires this long after its last event. "
        "Default: 3600.",
    )
    watcher_max_lag: int = Field(
        default=1024,
        gt=0,
        description=(
            "Events a watcher may fall behind before its stream ends with WATCHER_TOO_SLOW "
            "(it then resumes). Default: 1024."
        ),
    )
    flush_interval_s: float = Field(
        default=0.01,
        ge=0,
        description=(
            "Watchers are woken at most this often per Space, so a burst goes out in few "
            "messages. Default: 0.01."
        ),
    )
    gap_grace_s: float = Field(
        default=0.05,
        ge=0,
        description=(
            "How long an out-of-order event waits for its predecessors to arrive through "
            "Redis before they are read from PostgreSQL. Default: 0.05."
        ),
    )
    check_interval_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Seconds between checks of the watched Spaces' last sequence in PostgreSQL "
            "(recovers events whose Redis publish was lost). Default: 1."
        ),
    )
    replay_batch_size: int = Field(
        default=500,
        gt=0,
        description="Most events per WatchSpaceResponse while replaying. Default: 500.",
    )

    @model_validator(mode="after")
    def _retention_covers_resume_window(self) -> LiveSettings:
        if self.retention_s < self.resume_window_s:
            raise ValueError("retention_s must be at least resume_window_s")
        return self
