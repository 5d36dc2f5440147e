"""Backend addresses by proto package, and the media node hook."""

from __future__ import annotations

import pytest
from spaces.identity.v1 import identity_service_pb2
from spaces.media.v1 import media_service_pb2

from services.common.settings import CommonSettings
from services.gateway.transcoder.backend import BackendRouter, addresses_from_settings

MEDIA = media_service_pb2.DESCRIPTOR.services_by_name["MediaService"]
IDENTITY = identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"]


def test_addresses_come_from_the_shared_settings() -> None:
    common = CommonSettings(identity_addr="id:1", media_addr="media:2")
    addresses = addresses_from_settings(common)
    assert addresses["identity"] == "id:1" and addresses["media"] == "media:2"


async def test_package_picks_the_service() -> None:
    router = BackendRouter({"identity": "id:1", "media": "media:2"})
    assert await router.address(IDENTITY.methods_by_name["GetUser"], {"name": "users/me"}) == (
        "id:1"
    )
    negotiate = MEDIA.methods_by_name["Negotiate"]
    assert await router.address(negotiate, {"node": "mediaNodes/n1"}) == "media:2"


async def test_node_hook_routes_node_scoped_calls() -> None:
    asked: list[str] = []

    async def resolve(node: str) -> str | None:
        asked.append(node)
        return "10.0.0.7:50053" if node == "n7" else None

    router = BackendRouter({"media": "media:2"}, node_resolver=resolve)
    leave = MEDIA.methods_by_name["LeaveSession"]
    assert await router.address(leave, {"session": "mediaNodes/n7/sessions/s1"}) == (
        "10.0.0.7:50053"
    )
    # Unknown node: the media address (its load balancer) still gets the call.
    assert await router.address(leave, {"session": "mediaNodes/n9/sessions/s1"}) == "media:2"
    # Not node-scoped: the hook is not asked.
    await router.address(MEDIA.methods_by_name["GetRecording"], {"name": "spaces/a/recordings/b"})
    assert asked == ["n7", "n9"]


async def test_unknown_service_is_a_lookup_error() -> None:
    router = BackendRouter({})
    with pytest.raises(LookupError):
        await router.address(IDENTITY.methods_by_name["GetUser"], {})
