"""Webhook health: a webhook whose attempts keep failing is disabled, its owner sees it (in
ListWebhooks and in their inbox), and EnableWebhook turns it back on."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import grpc
import pytest
from spaces.notify.v1 import notify_resources_pb2 as res
from spaces.notify.v1 import notify_service_pb2 as pb
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events

from tests.integration.identity.harness import Identity, reason
from tests.integration.notify.harness import Notify, eventually, publish, receiving

Start = Callable[..., AbstractAsyncContextManager[Notify]]
LOOPBACK_ALLOWED = {"webhook_allow_private_addresses": True, "webhook_allow_http": True}


async def create(notify: Notify, identity: Identity, user: str, url: str) -> res.Webhook:
    response = await notify.stub.CreateWebhook(
        pb.CreateWebhookRequest(
            parent="users/me", webhook=res.Webhook(url=url), request_id=str(uuid.uuid4())
        ),
        metadata=identity.token_for(user),
    )
    return response.webhook


async def webhook_of(notify: Notify, identity: Identity, user: str) -> res.Webhook:
    listed = await notify.stub.ListWebhooks(
        pb.ListWebhooksRequest(parent="users/me"), metadata=identity.token_for(user)
    )
    (webhook,) = listed.webhooks
    return webhook


async def deliveries(
    notify: Notify, identity: Identity, user: str, webhook: res.Webhook
) -> list[res.WebhookDelivery]:
    listed = await notify.stub.ListWebhookDeliveries(
        pb.ListWebhookDeliveriesRequest(parent=webhook.name), metadata=identity.token_for(user)
    )
    return list(listed.deliveries)


async def invite(redis_url: str, user: str, actor: str, space: str) -> None:
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpeakInvitationEvent(space_id=space, invitee_id=user, inviter_id=actor),
    )


async def test_failing_webhook_is_disabled_shown_to_its_owner_and_enabled_again(
    start_notify: Start, identity: Identity, redis_url: str
) -> None:
    user, actor = await identity.bulk_users(2)
    settings = {
        **LOOPBACK_ALLOWED,
        "webhook_disable_after_failures": 3,
        # Far more attempts than the disabling threshold: the disabling stops them.
        "webhook_max_attempts": 50,
    }
    with receiving([500]) as receiver:
        async with start_notify(**settings) as notify:
            webhook = await create(notify, identity, user, receiver.url)
            await invite(redis_url, user, actor, "first")

            async def disabled() -> bool:
                current = await webhook_of(notify, identity, user)
                return current.state == res.Webhook.STATE_DISABLED

            await eventually(disabled, timeout=15)
            current = await webhook_of(notify, identity, user)
            assert current.consecutive_failures == 3
            assert current.HasField("disable_time")
            assert current.disabled_reason == "3 failed attempts in a row; last: HTTP 500"
            (dead,) = await deliveries(notify, identity, user, webhook)
            assert dead.state == res.WebhookDelivery.STATE_DEAD_LETTERED
            assert dead.attempt_count == 3
            assert dead.last_error.startswith("webhook disabled: 3 failed attempts")
            # The owner hears of it in their inbox (it names the webhook).
            inbox = await notify.stub.ListNotifications(
                pb.ListNotificationsRequest(parent="users/me"), metadata=identity.token_for(user)
            )
            notice = inbox.notifications[0]
            assert notice.kind == res.NOTIFICATION_KIND_WEBHOOK_DISABLED
            assert notice.subject == webhook.name
            assert receiver.url in notice.body

            # Nothing is queued for a disabled webhook.
            await invite(redis_url, user, actor, "while-disabled")

            async def second_notification() -> bool:
                rows = await notify.sql(
                    "SELECT 1 FROM notifications WHERE user_id = %s AND space = %s",
                    user,
                    "spaces/while-disabled",
                )
                return bool(rows)

            await eventually(second_notification)
            assert len(await deliveries(notify, identity, user, webhook)) == 1
            assert len(receiver.requests) == 3

            # The owner fixes their receiver and turns the webhook back on.
            receiver.replies = [200]
            enabled = await notify.stub.EnableWebhook(
                pb.EnableWebhookRequest(name=webhook.name), metadata=identity.token_for(user)
            )
            assert enabled.webhook.state == res.Webhook.STATE_ACTIVE
            assert enabled.webhook.consecutive_failures == 0
            assert not enabled.webhook.HasField("disable_time")
            assert enabled.webhook.disabled_reason == ""
            await invite(redis_url, user, actor, "after-enable")

            async def delivered() -> bool:
                states = [d.state for d in await deliveries(notify, identity, user, webhook)]
                return res.WebhookDelivery.STATE_SUCCEEDED in states

            await eventually(delivered)
    assert len(receiver.requests) == 4


async def test_a_success_resets_the_failure_count(
    start_notify: Start, identity: Identity, redis_url: str
) -> None:
    """Two failures, a success, two failures: never three in a row, never disabled."""
    user, actor = await identity.bulk_users(2)
    settings = {**LOOPBACK_ALLOWED, "webhook_disable_after_failures": 3}
    with receiving([500, 500, 200, 500, 500, 200]) as receiver:
        async with start_notify(**settings) as notify:
            webhook = await create(notify, identity, user, receiver.url)
            await invite(redis_url, user, actor, "one")

            async def first_delivered() -> bool:
                found = await deliveries(notify, identity, user, webhook)
                return bool(found) and found[0].state == res.WebhookDelivery.STATE_SUCCEEDED

            await eventually(first_delivered)
            assert (await webhook_of(notify, identity, user)).consecutive_failures == 0
            await invite(redis_url, user, actor, "two")

            async def both_delivered() -> bool:
                found = await deliveries(notify, identity, user, webhook)
                return len(found) == 2 and all(
                    d.state == res.WebhookDelivery.STATE_SUCCEEDED for d in found
                )

            await eventually(both_delivered)
            current = await webhook_of(notify, identity, user)
    assert current.state == res.Webhook.STATE_ACTIVE
    assert current.consecutive_failures == 0
    assert len(receiver.requests) == 6


async def test_enable_webhook_checks_owner_existence_and_address(
    start_notify: Start, identity: Identity
) -> None:
    alice, bob = await identity.bulk_users(2)
    async with start_notify(**LOOPBACK_ALLOWED) as notify:
        webhook = await create(notify, identity, alice, "http://127.0.0.1:9/hook")
        again = await notify.stub.EnableWebhook(
            pb.EnableWebhookRequest(name=webhook.name), metadata=identity.token_for(alice)
        )
        assert again.webhook == webhook  # already active: unchanged
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await notify.stub.EnableWebhook(
                pb.EnableWebhookRequest(name=webhook.name), metadata=identity.token_for(bob)
            )
        assert reason(foreign.value) == "NOT_OWNER"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await notify.stub.EnableWebhook(
                pb.EnableWebhookRequest(name=f"users/{alice}/webhooks/nope"),
                metadata=identity.token_for(alice),
            )
        assert reason(missing.value) == "WEBHOOK_NOT_FOUND"
        await notify.sql(
            "UPDATE webhooks SET state = 2, disabled_reason = 'x', disabled_time = now()"
        )
    # Private addresses are no longer allowed: it cannot be turned back on.
    async with start_notify(webhook_allow_http=True) as notify:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await notify.stub.EnableWebhook(
                pb.EnableWebhookRequest(name=webhook.name), metadata=identity.token_for(alice)
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason(refused.value) == "WEBHOOK_URL_NOT_ALLOWED"
        state = await notify.sql("SELECT state FROM webhooks")
    assert state == [(2,)]
