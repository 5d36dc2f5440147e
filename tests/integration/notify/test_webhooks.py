"""Webhooks: signed deliveries to a real HTTP receiver, retries, dead letters, SSRF refusal."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import grpc
import pytest
from spaces.notify.v1 import notify_resources_pb2 as res
from spaces.notify.v1 import notify_service_pb2 as pb
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events

from services.notify.domain import verify_signature
from tests.integration.identity.harness import Identity, reason
from tests.integration.notify.harness import Notify, eventually, publish, receiving

Start = Callable[..., AbstractAsyncContextManager[Notify]]


LOOPBACK_ALLOWED = {"webhook_allow_private_addresses": True, "webhook_allow_http": True}


async def create(
    notify: Notify, identity: Identity, user: str, url: str
) -> pb.CreateWebhookResponse:
    response: pb.CreateWebhookResponse = await notify.stub.CreateWebhook(
        pb.CreateWebhookRequest(
            parent="users/me", webhook=res.Webhook(url=url), request_id=str(uuid.uuid4())
        ),
        metadata=identity.token_for(user),
    )
    return response


async def test_signed_deliveries_are_retried_after_500s(
    start_notify: Start, identity: Identity, redis_url: str
) -> None:
    user, actor = await identity.bulk_users(2)
    with receiving([500, 500, 200]) as receiver:
        async with start_notify(**LOOPBACK_ALLOWED) as notify:
            created = await create(notify, identity, user, receiver.url)
            secret = created.signing_secret
            await publish(
                redis_url,
                "rooms",
                rooms_events.SpeakInvitationEvent(space_id="w", invitee_id=user, inviter_id=actor),
            )

            async def three() -> bool:
                return len(receiver.requests) >= 3

            await eventually(three, timeout=10)

            async def succeeded() -> bool:
                listed = await notify.stub.ListWebhookDeliveries(
                    pb.ListWebhookDeliveriesRequest(parent=created.webhook.name),
                    metadata=identity.token_for(user),
                )
                return listed.deliveries[0].state == res.WebhookDelivery.STATE_SUCCEEDED

            await eventually(succeeded)
            listed = await notify.stub.ListWebhookDeliveries(
                pb.ListWebhookDeliveriesRequest(parent=created.webhook.name),
                metadata=identity.token_for(user),
            )
    delivery = listed.deliveries[0]
    assert delivery.attempt_count == 3 and delivery.last_status_code == 200
    names = set()
    for received in receiver.requests:
        header, body = received.headers["Spaces-Signature"], received.body
        assert verify_signature(secret, header, body)
        assert not verify_signature("wrong", header, body)
        payload = json.loads(body)
        names.add(payload["delivery"])
        assert payload["notification"]["kind"] == "NOTIFICATION_KIND_SPEAK_INVITATION"
    assert names == {delivery.name}  # the same delivery name on every retry


async def test_dead_letter_after_max_attempts(
    start_notify: Start, identity: Identity, redis_url: str
) -> None:
    user, actor = await identity.bulk_users(2)
    with receiving([500]) as receiver:
        async with start_notify(**LOOPBACK_ALLOWED, webhook_max_attempts=3) as notify:
            created = await create(notify, identity, user, receiver.url)
            await publish(
                redis_url,
                "rooms",
                rooms_events.SpeakInvitationEvent(space_id="d", invitee_id=user, inviter_id=actor),
            )

            async def dead() -> bool:
                listed = await notify.stub.ListWebhookDeliveries(
                    pb.ListWebhookDeliveriesRequest(
                        parent=created.webhook.name,
                        state=res.WebhookDelivery.STATE_DEAD_LETTERED,
                    ),
                    metadata=identity.token_for(user),
                )
                return len(listed.deliveries) == 1

            await eventually(dead, timeout=10)
    assert len(receiver.requests) == 3


async def test_redirects_are_refused(
    start_notify: Start, identity: Identity, redis_url: str
) -> None:
    user, actor = await identity.bulk_users(2)
    with receiving([302]) as receiver:
        async with start_notify(**LOOPBACK_ALLOWED, webhook_max_attempts=1) as notify:
            created = await create(notify, identity, user, receiver.url)
            await publish(
                redis_url,
                "rooms",
                rooms_events.SpeakInvitationEvent(space_id="r", invitee_id=user, inviter_id=actor),
            )

            async def failed() -> bool:
                listed = await notify.stub.ListWebhookDeliveries(
                    pb.ListWebhookDeliveriesRequest(parent=created.webhook.name),
                    metadata=identity.token_for(user),
                )
                return bool(listed.deliveries) and listed.deliveries[0].state == (
                    res.WebhookDelivery.STATE_DEAD_LETTERED
                )

            await eventually(failed)
            listed = await notify.stub.ListWebhookDeliveries(
                pb.ListWebhookDeliveriesRequest(parent=created.webhook.name),
                metadata=identity.token_for(user),
            )
    assert "redirects are not followed" in listed.deliveries[0].last_error
    assert len(receiver.requests) == 1


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://localhost/hook",
        "http://example.com/hook",
    ],
)
async def test_private_addresses_and_http_are_refused_by_default(
    notify: Notify, identity: Identity, url: str
) -> None:
    (user,) = await identity.bulk_users(1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(notify, identity, user, url)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(refused.value) == "WEBHOOK_URL_NOT_ALLOWED"


async def test_address_checked_again_at_delivery_time(
    start_notify: Start, identity: Identity, redis_url: str, database_url: str
) -> None:
    """A webhook accepted while private addresses were allowed is refused once they are not."""
    user, actor = await identity.bulk_users(2)
    with receiving([200]) as receiver:
        async with start_notify(**LOOPBACK_ALLOWED) as notify:
            created = await create(notify, identity, user, receiver.url)
        async with start_notify(webhook_allow_http=True, webhook_max_attempts=1) as notify:
            await publish(
                redis_url,
                "rooms",
                rooms_events.SpeakInvitationEvent(space_id="s", invitee_id=user, inviter_id=actor),
            )

            async def refused() -> bool:
                listed = await notify.stub.ListWebhookDeliveries(
                    pb.ListWebhookDeliveriesRequest(parent=created.webhook.name),
                    metadata=identity.token_for(user),
                )
                return bool(listed.deliveries) and listed.deliveries[0].state == (
                    res.WebhookDelivery.STATE_DEAD_LETTERED
                )

            await eventually(refused)
    assert receiver.requests == []


async def test_webhook_crud_idempotency_and_ownership(
    start_notify: Start, identity: Identity
) -> None:
    alice, bob = await identity.bulk_users(2)
    async with start_notify(**LOOPBACK_ALLOWED) as notify:
        request = pb.CreateWebhookRequest(
            parent="users/me",
            webhook=res.Webhook(url="http://127.0.0.1:9/a"),
            request_id=str(uuid.uuid4()),
        )
        first = await notify.stub.CreateWebhook(request, metadata=identity.token_for(alice))
        again = await notify.stub.CreateWebhook(request, metadata=identity.token_for(alice))
        assert again.webhook.name == first.webhook.name
        assert again.signing_secret == first.signing_secret
        request.webhook.url = "http://127.0.0.1:9/b"
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await notify.stub.CreateWebhook(request, metadata=identity.token_for(alice))
        assert reason(reused.value) == "IDEMPOTENCY_KEY_REUSED"
        listed = await notify.stub.ListWebhooks(
            pb.ListWebhooksRequest(parent="users/me"), metadata=identity.token_for(alice)
        )
        assert [w.name for w in listed.webhooks] == [first.webhook.name]
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await notify.stub.DeleteWebhook(
                pb.DeleteWebhookRequest(name=first.webhook.name), metadata=identity.token_for(bob)
            )
        assert reason(foreign.value) == "NOT_OWNER"
        await notify.stub.DeleteWebhook(
            pb.DeleteWebhookRequest(name=first.webhook.name), metadata=identity.token_for(alice)
        )
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await notify.stub.DeleteWebhook(
                pb.DeleteWebhookRequest(name=first.webhook.name),
                metadata=identity.token_for(alice),
            )
        assert reason(gone.value) == "WEBHOOK_NOT_FOUND"
