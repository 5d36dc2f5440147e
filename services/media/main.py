"""Wiring of a media node: ``python -m services.media.main``.

Start-up (before health turns SERVING): connect Redis, bind the ICE/UDP mux, start the
egress workers and register the node in the registry; then the node reports its load every
heartbeat and serves sessions. Shutdown (SIGTERM): health turns NOT_SERVING, the node
drains (placement sends it nothing, rooms moves its participants, forwarding goes on until
they have left or ``MEDIA_DRAIN_GRACE_S`` ends), then the gRPC server stops and the node
leaves the registry.
"""

from __future__ import annotations

import gc
import logging

import grpc.aio
import redis.asyncio
from spaces.media.v1 import media_service_pb2 as pb
from spaces.media.v1 import media_service_pb2_grpc as pb_grpc

from services.common.auth import JwksSource, ServiceTokenIssuer
from services.common.clients import create_channel
from services.common.grants import MediaGrantSettings, MediaGrantVerifier
from services.common.jwks_client import IdentityJwksSource
from services.common.redis import create_redis
from services.common.server import Service, serve
from services.common.settings import CommonSettings
from services.media.api import MediaApi
from services.media.clients import (
    PAYMENTS_IDEMPOTENT,
    ROOMS_IDEMPOTENT,
    GrpcNodeLink,
    GrpcRooms,
    GrpcSpaceAccess,
)
from services.media.engine import MediaEngine
from services.media.node import MediaNode, NodeOptions
from services.media.registry import NodeRegistry
from services.media.settings import MediaSettings

logger = logging.getLogger(__name__)

__all__ = ["SERVICE_NAME", "MediaRuntime", "build_service", "main"]

SERVICE_NAME = "media"


class MediaRuntime:
    """What a media process opens at start-up (inside the server's event loop: gRPC aio
    channels and Redis clients bind to the loop that creates them) and closes at shutdown.

    :param settings: media's settings.
    :param common: the shared settings.
    :param grants: the media grant secret.
    """

    def __init__(
        self, settings: MediaSettings, common: CommonSettings, grants: MediaGrantSettings
    ) -> None:
        if grants.secret is None:
            raise RuntimeError("media needs SPACES_MEDIA_GRANT_SECRET to verify grants")
        if common.internal_secret is None:
            raise RuntimeError("media needs SPACES_INTERNAL_SECRET to call rooms")
        self.settings = settings
        self.common = common
        self._verifier = MediaGrantVerifier(grants.secret)
        self._issuer = ServiceTokenIssuer(SERVICE_NAME, common.internal_secret)
        self._node: MediaNode | None = None
        self._node_link: GrpcNodeLink | None = None
        self._access: GrpcSpaceAccess | None = None
        self._redis: redis.asyncio.Redis | None = None
        self._channels: list[grpc.aio.Channel] = []

    @property
    def node(self) -> MediaNode:
        """The started node."""
        if self._node is None:
            raise RuntimeError("the media runtime has not started")
        return self._node

    @property
    def access(self) -> GrpcSpaceAccess:
        """The recordings' access check."""
        if self._access is None:
            raise RuntimeError("the media runtime has not started")
        return self._access

    async def start(self, grpc_port: int) -> None:
        """Connect Redis and the channels, bind the ICE mux and register the node."""
        settings, common = self.settings, self.common
        self._redis = create_redis(common.redis_url)
        await self._redis.ping()
        rooms = create_channel(
            common.rooms_addr, idempotent_methods=ROOMS_IDEMPOTENT, token_issuer=self._issuer
        )
        payments = create_channel(
            common.payments_addr, idempotent_methods=PAYMENTS_IDEMPOTENT, token_issuer=self._issuer
        )
        self._channels = [rooms, payments]
        self._access = GrpcSpaceAccess(rooms, payments)
        address = settings.advertise_addr or f"{settings.grpc_host_for_peers}:{grpc_port}"
        self._node_link = GrpcNodeLink(self._issuer)
        self._node = MediaNode(
            MediaEngine(settings.engine_config()),
            NodeRegistry(self._redis, settings.node_ttl_s),
            self._verifier,
            GrpcRooms(rooms),
            NodeOptions(
                node_id=settings.node_id,
                address=address,
                endpoint=settings.public_endpoint,
                capacity=settings.capacity,
                heartbeat_s=settings.heartbeat_s,
                drain_grace_s=settings.drain_grace_s,
                levels_interval_s=settings.levels_interval_s,
                recordings_dir=settings.recordings_dir,
                recording_retention_s=settings.recording_retention_days * 86400,
                captions=settings.captions,
                max_negotiations=settings.max_negotiations,
            ),
            self._node_link,
        )
        await self._node.start()

    async def drain(self) -> None:
        """Move the node's participants away (bounded by the drain grace)."""
        if self._node is not None:
            await self._node.drain()
            await self._node.wait_drained()

    async def stop(self) -> None:
        """Close sessions, leave the registry, close the channels and Redis."""
        if self._node is not None:
            await self._node.stop()
            self._node = None
        for channel in self._channels:
            await channel.close(None)
        self._channels = []
        if self._node_link is not None:
            await self._node_link.close()
            self._node_link = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def build_service(
    settings: MediaSettings,
    common: CommonSettings,
    grants: MediaGrantSettings,
    *,
    jwks: JwksSource | None = None,
) -> tuple[Service, MediaRuntime]:
    """Build the media server (not started) and the runtime its hooks open and close.

    :param jwks: where user-token keys come from; identity's GetJwks by default.
    :raises RuntimeError: when a required secret is missing.
    """
    runtime = MediaRuntime(settings, common, grants)
    source: JwksSource
    remote = None
    if jwks is None:
        remote = IdentityJwksSource.connect(common.identity_addr)
        source = remote
    else:
        source = jwks
    service = Service(SERVICE_NAME, settings, common, jwks=source)
    service.add_servicer(
        pb.DESCRIPTOR.services_by_name["MediaService"],
        MediaApi(runtime, settings.recordings_dir),
        pb_grpc.add_MediaServiceServicer_to_server,
    )

    async def start() -> None:
        await runtime.start(service.port)

    service.on_startup(start)
    service.on_drain(runtime.drain)
    service.on_shutdown(runtime.stop)
    if remote is not None:
        service.on_shutdown(remote.close)
    return service, runtime


def main() -> None:
    """Run a media node until SIGTERM/SIGINT."""
    service, _ = build_service(MediaSettings(), CommonSettings(), MediaGrantSettings())
    # Everything loaded so far (modules, classes, settings) lives as long as the process:
    # full collections, which stop forwarding while they run, need not scan it again.
    gc.collect()
    gc.freeze()
    serve(service)


if __name__ == "__main__":
    main()
