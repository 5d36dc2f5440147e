"""Push adapters through the delivery engine: FCM and Web Push against real HTTP servers in
the test, retries, forgotten devices; and adapters that need the internet stay off by
default and say so, with nothing queued and nothing reported as sent."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spaces.notify.v1 import notify_resources_pb2 as res
from spaces.notify.v1 import notify_service_pb2 as pb
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events

from services.notify.domain import Draft
from services.notify.settings import NotifySettings
from services.notify.store import PostgresNotifyStore, create_notifications
from services.notify.webhooks import AddressPolicy, DeliveryEngine, build_push_adapters
from tests.integration.identity.harness import Identity
from tests.integration.notify.harness import Notify, eventually, notify_settings, publish, receiving

Start = Callable[..., AbstractAsyncContextManager[Notify]]
FCM_ON = {"fcm_project_id": "spaces-test", "fcm_access_token": "test-access-token"}
UNREGISTERED = (
    404,
    '{"error": {"code": 404, "status": "NOT_FOUND", "details": [{"errorCode": "UNREGISTERED"}]}}',
)


async def register(
    notify: Notify, identity: Identity, user: str, platform: int, token: str
) -> res.Device:
    response = await notify.stub.RegisterDevice(
        pb.RegisterDeviceRequest(parent="users/me", platform=platform, token=token),  # type: ignore[arg-type]
        metadata=identity.token_for(user),
    )
    return response.device


async def invite(redis_url: str, user: str, actor: str, space: str) -> None:
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpeakInvitationEvent(space_id=space, invitee_id=user, inviter_id=actor),
    )


async def push_states(notify: Notify) -> list[tuple[int, int, str]]:
    rows = await notify.sql(
        "SELECT state, attempt_count, last_error FROM deliveries WHERE channel = 2 ORDER BY id"
    )
    return [(int(r[0]), int(r[1]), str(r[2])) for r in rows]


async def test_fcm_push_goes_out_and_is_retried_after_a_500(
    start_notify: Start, identity: Identity, redis_url: str
) -> None:
    user, actor = await identity.bulk_users(2)
    with receiving([500, 200]) as fcm:
        async with start_notify(**FCM_ON, fcm_endpoint=fcm.base_url) as notify:
            await register(notify, identity, user, res.PLATFORM_FCM, "fcm-token-1")
            await invite(redis_url, user, actor, "pushed")

            async def succeeded() -> bool:
                states = await push_states(notify)
                return bool(states) and states[0][0] == 3

            await eventually(succeeded)
            assert await push_states(notify) == [(3, 2, "")]
            (notification_id,) = (await notify.sql("SELECT id FROM notifications"))[0]
    assert len(fcm.requests) == 2
    for request in fcm.requests:
        assert request.path == "/v1/projects/spaces-test/messages:send"
        assert request.headers["Authorization"] == "Bearer test-access-token"
        message = json.loads(request.body)["message"]
        assert message["token"] == "fcm-token-1"
        assert message["notification"]["title"] == "You were invited to speak"
        assert message["data"] == {"notification": f"users/{user}/notifications/{notification_id}"}


async def test_fcm_unregistered_token_forgets_the_device(
    start_notify: Start, identity: Identity, redis_url: str
) -> None:
    user, actor = await identity.bulk_users(2)
    with receiving([UNREGISTERED]) as fcm:
        async with start_notify(**FCM_ON, fcm_endpoint=fcm.base_url) as notify:
            await register(notify, identity, user, res.PLATFORM_FCM, "stale-token")
            await invite(redis_url, user, actor, "stale")

            async def dead() -> bool:
                states = await push_states(notify)
                return bool(states) and states[0][0] == 4

            await eventually(dead)
            assert await push_states(notify) == [(4, 1, "HTTP 404")]
            assert await notify.sql("SELECT id FROM devices") == []
    assert len(fcm.requests) == 1


def vapid_key() -> tuple[str, ec.EllipticCurvePublicKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, key.public_key()


async def test_web_push_sends_a_vapid_signed_empty_push(
    start_notify: Start, identity: Identity, redis_url: str
) -> None:
    user, actor = await identity.bulk_users(2)
    pem, public = vapid_key()
    with receiving([201, 410]) as push_service:
        subscription = json.dumps(
            {
                "endpoint": f"{push_service.base_url}/push/subscription-1",
                "keys": {"p256dh": "x", "auth": "y"},
            }
        )
        async with start_notify(
            webhook_allow_private_addresses=True,
            webhook_allow_http=True,
            webpush_vapid_private_key=pem,
            webpush_vapid_subject="mailto:ops@spaces.test",
        ) as notify:
            await register(notify, identity, user, res.PLATFORM_WEB_PUSH, subscription)
            await invite(redis_url, user, actor, "web")

            async def succeeded() -> bool:
                states = await push_states(notify)
                return bool(states) and states[0][0] == 3

            await eventually(succeeded)
            # The browser unsubscribed (410 Gone): the next push forgets the device.
            await invite(redis_url, user, actor, "web-again")

            async def forgotten() -> bool:
                return await notify.sql("SELECT id FROM devices") == []

            await eventually(forgotten)
            assert [s[0] for s in await push_states(notify)] == [3, 4]
    first = push_service.requests[0]
    assert first.path == "/push/subscription-1"
    assert first.body == b""  # no payload: the service worker fetches the inbox
    assert first.headers["TTL"] == "86400"
    scheme, _, params = first.headers["Authorization"].partition(" ")
    assert scheme == "vapid"
    fields = dict(part.split("=", 1) for part in params.split(","))
    raw = base64.urlsafe_b64decode(fields["k"] + "=" * (-len(fields["k"]) % 4))
    assert raw == public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    claims = jwt.decode(fields["t"], public, algorithms=["ES256"], audience=push_service.base_url)
    assert claims["sub"] == "mailto:ops@spaces.test"
    assert claims["exp"] > dt.datetime.now(dt.UTC).timestamp()


async def test_web_push_endpoint_on_a_private_address_is_refused(
    start_notify: Start, identity: Identity, redis_url: str
) -> None:
    """Users choose their subscription endpoint: it is held to the webhook address rules."""
    user, actor = await identity.bulk_users(2)
    pem, _ = vapid_key()
    with receiving([201]) as push_service:
        subscription = json.dumps({"endpoint": f"{push_service.base_url}/push/internal"})
        async with start_notify(
            webhook_allow_http=True, webpush_vapid_private_key=pem, webhook_max_attempts=1
        ) as notify:
            await register(notify, identity, user, res.PLATFORM_WEB_PUSH, subscription)
            await invite(redis_url, user, actor, "internal")

            async def dead() -> bool:
                states = await push_states(notify)
                return bool(states) and states[0][0] == 4

            await eventually(dead)
            ((_, _, error),) = await push_states(notify)
    assert "loopback, private or link-local" in error
    assert push_service.requests == []


async def test_adapters_needing_the_internet_are_off_by_default_and_say_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = NotifySettings(_env_file=None)  # type: ignore[call-arg]
    policy = AddressPolicy(allow_private=False, allow_http=False)
    async with httpx.AsyncClient() as client:
        with caplog.at_level(logging.WARNING, logger="services.notify.webhooks"):
            adapters = build_push_adapters(settings, client, policy)
    assert {platform: adapter.enabled for platform, adapter in adapters.items()} == {
        res.PLATFORM_APNS: False,
        res.PLATFORM_FCM: False,
        res.PLATFORM_WEB_PUSH: False,
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all(" is off" in warning for warning in warnings)
    assert any("fcm.googleapis.com" in w for w in warnings)
    assert any("push services on the internet" in w for w in warnings)
    assert any("APNs" in w and "HTTP/2" in w for w in warnings)


async def test_devices_get_nothing_queued_while_their_adapter_is_off(
    notify: Notify, identity: Identity, redis_url: str
) -> None:
    """Default settings: devices register fine, but no push is queued (never a fake send)."""
    user, actor = await identity.bulk_users(2)
    for platform, token in [
        (res.PLATFORM_APNS, "apns-token"),
        (res.PLATFORM_FCM, "fcm-token"),
        (res.PLATFORM_WEB_PUSH, json.dumps({"endpoint": "https://push.example.com/x"})),
    ]:
        await register(notify, identity, user, platform, token)
    await invite(redis_url, user, actor, "quiet")

    async def created() -> bool:
        return bool(await notify.sql("SELECT 1 FROM notifications WHERE user_id = %s", user))

    await eventually(created)
    assert await notify.sql("SELECT count(*) FROM deliveries") == [(0,)]


async def test_a_push_left_over_from_an_adapter_switched_off_is_dead_lettered(
    notify: Notify, identity: Identity
) -> None:
    """A push queued while FCM was on, attempted by a replica where it is off: dead-lettered
    with the adapter's reason, not reported as sent."""
    (user,) = await identity.bulk_users(1)
    await register(notify, identity, user, res.PLATFORM_FCM, "fcm-token")
    assert notify.runtime.pool is not None and notify.runtime.http is not None
    when_fcm_was_on = PostgresNotifyStore(notify.runtime.pool, [res.PLATFORM_FCM])
    async with notify.runtime.pool.connection() as conn:
        await create_notifications(
            conn,
            [
                Draft(
                    user_id=user,
                    kind=res.NOTIFICATION_KIND_TIP_RECEIVED,
                    title="Tip",
                    dedupe_key="t",
                )
            ],
            when_fcm_was_on.push_platforms,
        )
    settings = notify_settings()
    policy = AddressPolicy(allow_private=False, allow_http=False)
    engine = DeliveryEngine(
        when_fcm_was_on,
        notify.runtime.http,
        policy,
        build_push_adapters(settings, notify.runtime.http, policy),
        settings,
    )

    async def attempted() -> bool:
        await engine.run_once()
        return bool(await push_states(notify)) and (await push_states(notify))[0][0] == 4

    await eventually(attempted)
    ((state, attempts, error),) = await push_states(notify)
    assert (state, attempts) == (4, 1)
    assert error.startswith("FCM push is off")
