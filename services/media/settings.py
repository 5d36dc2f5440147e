"""Media's own settings (env prefix ``MEDIA_``); the shared ones are ``SPACES_``.

A media node has three addresses: the gRPC address other Spaces processes reach it on
(``MEDIA_ADVERTISE_ADDR``, written to the node registry so the gateway and other nodes can
route node-scoped calls to it), the UDP address of its ICE mux (``MEDIA_ICE_HOST`` and
``MEDIA_ICE_PORT``, announced to apps as ``MEDIA_ICE_ANNOUNCE`` when the node sits behind a
NAT or a host port), and an optional public signalling URL handed to apps in their grants.
"""

from __future__ import annotations

import logging
import re
import socket
import tempfile
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.media.config import MediaConfig

logger = logging.getLogger(__name__)

__all__ = ["MediaSettings", "default_node_id"]

_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def default_node_id() -> str:
    """The host name made into a node id (``Media_Pod.7`` → ``media-pod-7``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")
    return (name or "media")[:63]


class MediaSettings(ServiceSettings):
    """Configuration of one media node (env prefix ``MEDIA_``)."""

    model_config = SettingsConfigDict(
        env_prefix="MEDIA_", env_file=".env", extra="ignore", frozen=True
    )

    grpc_port: int = Field(default=50053, ge=0, le=65535, description="gRPC port. Default: 50053.")
    metrics_port: int | None = Field(
        default=9103,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; unset disables it. Default: 9103.",
    )
    node_id: str = Field(
        default_factory=default_node_id,
        description=(
            "This node's id in the registry (`mediaNodes/{node_id}`): lower-case letters, "
            "digits and '-'. Default: the host name (the pod name in Kubernetes)."
        ),
    )
    advertise_addr: str | None = Field(
        default=None,
        description=(
            "host:port other Spaces processes reach this node's gRPC server on (the pod IP "
            "in Kubernetes). Default: <host name>:<gRPC port>."
        ),
    )
    public_endpoint: str = Field(
        default="",
        description=(
            "Base URL apps send this node's media signalling to, when nodes are exposed "
            "separately; empty means the gateway that serves the rest of the API. Default: ''."
        ),
    )
    ice_host: str = Field(
        default="127.0.0.1",
        description=(
            "Local address the ICE/UDP mux binds (an address of this node, not a wildcard). "
            "Default: 127.0.0.1 (a laptop); in a cluster, the pod IP."
        ),
    )
    ice_port: int = Field(
        default=3478,
        ge=0,
        le=65535,
        description="UDP port of the ICE mux; 0 picks a free one. Default: 3478.",
    )
    ice_announce: str | None = Field(
        default=None,
        description=(
            "Address written into media's ICE candidates when apps must reach another one "
            "(the node's public IP behind a host port or a UDP load balancer). Default: "
            "MEDIA_ICE_HOST."
        ),
    )
    capacity: int = Field(
        default=2000,
        ge=1,
        description=(
            "Peers (publishers and listeners) this node accepts; placement sends no more. "
            "One node per CPU core. Default: 2000."
        ),
    )
    slot_count: int = Field(
        default=3, ge=1, le=16, description="Listening slots per listener. Default: 3."
    )
    egress_threads: int = Field(
        default=1, ge=0, le=8, description="Egress worker threads (0: inline). Default: 1."
    )
    gc_freeze: bool = Field(
        default=True,
        description=(
            "Freeze joined sessions out of CPython's full collections, which stop forwarding "
            "while they run, and reclaim what closed sessions left in reference cycles once "
            "MEDIA_GC_UNFREEZE_AFTER_CLOSED of them have closed. Default: true."
        ),
    )
    gc_unfreeze_after_closed: int = Field(
        default=500,
        ge=1,
        description=(
            "Closed sessions whose cycles (about 80 KB each) wait before one full collection "
            "reclaims them. Default: 500."
        ),
    )
    egress_split: int = Field(
        default=2,
        ge=1,
        le=8,
        description=(
            "Threads each fan-out is split across (the egress worker and native helper "
            "threads that never take the GIL), so the last listener's packet leaves "
            "sooner; never more threads than CPUs; 1 sends from the worker alone. "
            "Default: 2."
        ),
    )
    native_srtp: bool = Field(
        default=True,
        description=(
            "Protect listeners' RTP with the fast path's own SRTP AES-GCM code (AES-NI) "
            "instead of libsrtp, where the profile and CPU allow. Default: true."
        ),
    )
    consent_plane: bool = Field(
        default=True,
        description=(
            "Answer and verify connected sessions' ICE consent checks on a native thread "
            "of their own, off the event loop (STUN is steered to it by a BPF program on "
            "the ICE port); false keeps them on the event loop. Default: true."
        ),
    )
    heartbeat_s: float = Field(
        default=0.5,
        gt=0,
        le=30,
        description="Seconds between the node's reports to the registry. Default: 0.5.",
    )
    node_ttl_s: float = Field(
        default=2.0,
        gt=0,
        le=120,
        description=(
            "Seconds after its last report a silent node counts as dead; its participants "
            "are then moved (four missed reports by default). Default: 2."
        ),
    )
    drain_grace_s: float = Field(
        default=300.0,
        ge=0,
        le=21600,
        description=(
            "On SIGTERM (or DrainNode without a grace), how long live sessions may stay "
            "while rooms moves them elsewhere; keep it below the pod's "
            "terminationGracePeriodSeconds. Default: 300."
        ),
    )
    levels_interval_s: float = Field(
        default=0.25,
        gt=0,
        le=5,
        description="Seconds between speaking-level reports to rooms. Default: 0.25.",
    )

    recordings_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "spaces-recordings",
        description=(
            "Directory of recording files (a volume in Kubernetes). Default: "
            "<temp dir>/spaces-recordings."
        ),
    )

    recording_retention_days: float = Field(
        default=30.0,
        gt=0,
        description="Days a finished recording stays playable before it is deleted. Default: 30.",
    )

    max_negotiations: int = Field(
        default=32,
        ge=1,
        description=(
            "Session negotiations in progress at once; more get RESOURCE_EXHAUSTED with a "
            "retry delay. Default: 32."
        ),
    )
    captions: bool = Field(
        default=False,
        description=(
            "Run live captions (offline English recognition, about a third of a core per "
            "speaker) for the Spaces this node originates. Default: false."
        ),
    )

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, value: str) -> str:
        if not _NODE_ID.match(value):
            raise ValueError("node_id must match [a-z0-9][a-z0-9-]{0,62}")
        return value

    @property
    def grpc_host_for_peers(self) -> str:
        """The host part other processes use: the bound address, or the host name when
        the server binds every interface."""
        if self.grpc_host in ("", "0.0.0.0", "::", "[::]"):
            return socket.gethostname()
        return self.grpc_host

    @property
    def grpc_address(self) -> str:
        """Where other processes reach this node's gRPC server."""
        return self.advertise_addr or f"{self.grpc_host_for_peers}:{self.grpc_port}"

    def engine_config(self) -> MediaConfig:
        """The engine's configuration."""
        return MediaConfig(
            host=self.ice_host,
            port=self.ice_port,
            announce=self.ice_announce,
            slot_count=self.slot_count,
            egress_threads=self.egress_threads,
            egress_split=self.egress_split,
            gc_freeze=self.gc_freeze,
            gc_unfreeze_after_closed=self.gc_unfreeze_after_closed,
            levels_interval=self.levels_interval_s,
            native_srtp=self.native_srtp,
            consent_plane=self.consent_plane,
        )
