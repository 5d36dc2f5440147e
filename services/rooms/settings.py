"""Rooms' own settings (env prefix ``ROOMS_``); the shared ones are ``SPACES_``.

Sample (every line shows the default)::

    ROOMS_GRPC_PORT=50052
    ROOMS_METRICS_PORT=9102
    ROOMS_MAX_CO_HOSTS=2
    ROOMS_MAX_SPEAKERS=10
    ROOMS_MAX_PARTICIPANTS=0                 # 0 = unlimited
    ROOMS_MAX_SCHEDULE_AHEAD=P14D
    ROOMS_MAX_SCHEDULED_SPACES=20
    ROOMS_MAX_INVITED_USERS=1000
    ROOMS_HOST_ABSENCE_GRACE=PT5M
    ROOMS_PARTICIPANT_DISCONNECT_GRACE=PT2M
    ROOMS_START_GRACE=PT1H
    ROOMS_SWEEP_INTERVAL_S=5
    ROOMS_GAUGE_INTERVAL_S=10
    ROOMS_LISTENER_EVENTS_MAX=200
    ROOMS_BLOCK_CACHE_TTL_S=2
    ROOMS_BLOCK_CACHE_SIZE=100000
    ROOMS_CONSUMER_NAME=<hostname>
    ROOMS_REACTIONS_PER_SECOND=5
    ROOMS_JOIN_LINK_SECRET=...              # 32+ random bytes
    ROOMS_JOIN_LINK_BASE_URI=https://spaces.example.org/join
    ROOMS_MEDIA_PUBLIC_URI=https://api.example.org
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

logger = logging.getLogger(__name__)

__all__ = ["RoomsSettings"]


class RoomsSettings(ServiceSettings):
    """Configuration of the rooms process (env prefix ``ROOMS_``)."""

    model_config = SettingsConfigDict(
        env_prefix="ROOMS_", env_file=".env", extra="ignore", frozen=True
    )

    grpc_port: int = Field(default=50052, ge=0, le=65535, description="gRPC port. Default: 50052.")
    metrics_port: int | None = Field(
        default=9102,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; unset disables it. Default: 9102.",
    )

    # -- stage limits ------------------------------------------------------------------
    max_co_hosts: int = Field(default=2, ge=0, description="Co-hosts per Space. Default: 2.")
    max_speakers: int = Field(
        default=10, ge=0, description="Speakers per Space, not counting moderators. Default: 10."
    )
    max_participants: int = Field(
        default=0,
        ge=0,
        description="Participants per Space (SPACE_FULL); 0 means unlimited. Default: 0.",
    )

    # -- schedules ---------------------------------------------------------------------
    max_schedule_ahead: timedelta = Field(
        default=timedelta(days=14),
        gt=timedelta(0),
        description="How far ahead a Space may be scheduled. Default: 14 days.",
    )
    max_scheduled_spaces: int = Field(
        default=20, ge=1, description="Scheduled Spaces one host may have. Default: 20."
    )
    start_grace: timedelta = Field(
        default=timedelta(hours=1),
        gt=timedelta(0),
        description=(
            "A scheduled Space not started this long after its start time is canceled "
            "(NOT_STARTED). Default: 1 hour."
        ),
    )
    max_invited_users: int = Field(
        default=1000, ge=1, description="Size of a Space's invite list. Default: 1000."
    )

    # -- presence ----------------------------------------------------------------------
    host_absence_grace: timedelta = Field(
        default=timedelta(minutes=5),
        gt=timedelta(0),
        description=(
            "A live Space whose host's media connection stays down this long ends "
            "(HOST_ABSENT). Default: 5 minutes."
        ),
    )
    participant_disconnect_grace: timedelta = Field(
        default=timedelta(minutes=2),
        gt=timedelta(0),
        description=(
            "A participant (not the host) whose connection stays down this long leaves the "
            "Space. Default: 2 minutes."
        ),
    )
    sweep_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often each replica looks for absent hosts and stale Spaces. Default: 5.",
    )

    gauge_interval_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "How often each replica reads the live Spaces and participants by role for its "
            "gauges (spaces_rooms_live_spaces, spaces_rooms_participants). Default: 10."
        ),
    )

    max_concurrent_joins: int = Field(
        default=64,
        ge=1,
        description=(
            "JoinSpace calls in progress at once in this replica; more are refused at once "
            "with RESOURCE_EXHAUSTED and a retry delay (429 at the gateway), so a crowd "
            "joining together gets answers in time instead of timeouts. Default: 64."
        ),
    )
    listener_events_max: int = Field(
        default=200,
        ge=0,
        description=(
            "Listeners' participant_joined / participant_left events go to watchers only "
            "while the Space has at most this many participants; above it, watchers follow "
            "the coalesced participant counts. Default: 200."
        ),
    )

    # -- identity answers ----------------------------------------------------------------
    block_cache_ttl_s: float = Field(
        default=2.0,
        ge=0,
        description=(
            "How long a replica reuses identity's answer to 'is there a block between this "
            "host and this user' on the join/watch path; 0 turns the cache off. A new block "
            "also drops the pair at once on every replica (identity's user.blocked event), "
            "so this only bounds staleness when that event is late. Default: 2."
        ),
    )
    consumer_name: str = Field(
        default_factory=socket.gethostname,
        description=(
            "This replica's name in the 'rooms' consumer group of identity's events (a "
            "block made by a live Space's host removes the blocked user). Default: hostname."
        ),
    )
    block_cache_size: int = Field(
        default=100_000,
        ge=1,
        description="Pairs the block cache holds (oldest dropped first). Default: 100000.",
    )

    # -- reactions ---------------------------------------------------------------------
    reactions_per_second: int = Field(
        default=5, ge=1, description="Reactions one participant may send per second. Default: 5."
    )

    # -- join links --------------------------------------------------------------------
    join_link_secret: SecretStr | None = Field(
        default=None,
        description=(
            "HMAC key (32+ bytes) join links are signed with, the same on every replica. "
            "Default: unset (derived from SPACES_INTERNAL_SECRET)."
        ),
    )
    join_link_base_uri: str = Field(
        default="https://spaces.example.org/join",
        description="Base of JoinLink.uri; the token is appended as ?token=. ",
    )
    media_public_uri: str = Field(
        default="https://api.example.org",
        description="MediaEndpoint.uri handed to apps (the gateway's public URL).",
    )

    # -- database ----------------------------------------------------------------------
    db_pool_min_size: int = Field(default=1, ge=0, description="Pooled connections kept open.")
    db_pool_max_size: int = Field(default=20, ge=1, description="Most pooled connections.")

    @model_validator(mode="after")
    def _check(self) -> RoomsSettings:
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("db_pool_min_size must not exceed db_pool_max_size")
        return self
