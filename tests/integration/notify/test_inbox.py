"""Inbox, preferences, live stream and the event catalogue, against real identity."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
from google.protobuf import field_mask_pb2
from spaces.common.v1 import money_pb2
from spaces.identity.v1 import identity_service_pb2 as identity_pb
from spaces.media.v1 import media_events_pb2, media_resources_pb2
from spaces.notify.v1 import notify_resources_pb2 as res
from spaces.notify.v1 import notify_service_pb2 as pb
from spaces.payments.v1 import payments_events_pb2, payments_resources_pb2
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_pb

from tests.integration.identity.harness import Identity, follow, reason
from tests.integration.notify.harness import Notify, eventually, publish, stamp

K = res.NotificationKind


async def inbox(notify: Notify, identity: Identity, user: str) -> list[res.Notification]:
    response = await notify.stub.ListNotifications(
        pb.ListNotificationsRequest(parent="users/me", page_size=100),
        metadata=identity.token_for(user),
    )
    return list(response.notifications)


async def wait_inbox(
    notify: Notify, identity: Identity, user: str, count: int
) -> list[res.Notification]:
    async def enough() -> bool:
        return len(await inbox(notify, identity, user)) >= count

    try:
        await eventually(enough)
    except AssertionError:
        got = await inbox(notify, identity, user)
        raise AssertionError(f"{user} has {[(n.kind, n.title) for n in got]}") from None
    return await inbox(notify, identity, user)


async def test_catalogue_reaches_the_right_people(
    notify: Notify, identity: Identity, redis_url: str
) -> None:
    host, listener, cohost = await identity.bulk_users(3)
    space = "sp1"
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpeakRequestedEvent(
            space_id=space, requester_id=listener, moderator_ids=[host, cohost, listener]
        ),
    )
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpeakInvitationEvent(space_id=space, invitee_id=listener, inviter_id=host),
    )
    await publish(
        redis_url,
        "rooms",
        rooms_events.CoHostInvitationEvent(space_id=space, invitee_id=cohost, inviter_id=host),
    )
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpaceInvitationEvent(
            space_id=space, inviter_id=host, invitee_ids=[listener], title="Private"
        ),
    )
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpaceStartedEvent(
            space_id=space,
            host_id=host,
            title="Jazz",
            visibility=rooms_pb.SPACE_VISIBILITY_EVERYONE,
        ),
    )
    price = money_pb2.Money(amount_minor=500, currency_code="USD")
    ticket = payments_resources_pb2.Ticket(
        name=f"spaces/{space}/tickets/t1", owner=f"users/{listener}", price=price
    )
    await publish(
        redis_url, "payments", payments_events_pb2.TicketPurchasedEvent(ticket=ticket, host_id=host)
    )
    await publish(
        redis_url,
        "payments",
        payments_events_pb2.TipSentEvent(
            tip=payments_resources_pb2.Tip(
                name=f"spaces/{space}/tips/x1",
                sender=f"users/{listener}",
                recipient=f"users/{host}",
                amount=price,
                message="great",
            )
        ),
    )

    # The recording comes last, as in life: notify must know the host and ticket holders.
    await wait_inbox(notify, identity, host, 3)
    await wait_inbox(notify, identity, listener, 3)
    await publish(
        redis_url,
        "media",
        media_events_pb2.RecordingReadyEvent(
            recording=media_resources_pb2.Recording(
                name=f"spaces/{space}/recordings/r1", space=f"spaces/{space}"
            )
        ),
    )
    host_inbox = await wait_inbox(notify, identity, host, 4)
    assert sorted(n.kind for n in host_inbox) == sorted(
        [
            K.NOTIFICATION_KIND_SPEAK_REQUESTED,
            K.NOTIFICATION_KIND_TICKET_PURCHASED,
            K.NOTIFICATION_KIND_TIP_RECEIVED,
            K.NOTIFICATION_KIND_RECORDING_AVAILABLE,
        ]
    )
    tip = next(n for n in host_inbox if n.kind == K.NOTIFICATION_KIND_TIP_RECEIVED)
    assert tip.actor == f"users/{listener}" and "5.00 USD" in tip.title and tip.body == "great"
    await publish(
        redis_url,
        "payments",
        payments_events_pb2.TicketRefundedEvent(ticket=ticket, host_id=host, note="sorry"),
    )
    listener_inbox = await wait_inbox(notify, identity, listener, 5)
    assert sorted(n.kind for n in listener_inbox) == sorted(
        [
            K.NOTIFICATION_KIND_SPEAK_INVITATION,
            K.NOTIFICATION_KIND_SPACE_INVITATION,
            K.NOTIFICATION_KIND_TICKET_PURCHASED,
            K.NOTIFICATION_KIND_RECORDING_AVAILABLE,
            K.NOTIFICATION_KIND_TICKET_REFUNDED,
        ]
    )
    cohost_inbox = await wait_inbox(notify, identity, cohost, 2)
    assert sorted(n.kind for n in cohost_inbox) == sorted(
        [K.NOTIFICATION_KIND_SPEAK_REQUESTED, K.NOTIFICATION_KIND_CO_HOST_INVITATION]
    )
    assert all(n.space == f"spaces/{space}" for n in cohost_inbox)


async def test_pagination_mark_read_and_unread_count(
    notify: Notify, identity: Identity, redis_url: str
) -> None:
    user, actor = await identity.bulk_users(2)
    for i in range(5):
        await publish(
            redis_url,
            "rooms",
            rooms_events.SpeakInvitationEvent(space_id=f"s{i}", invitee_id=user, inviter_id=actor),
        )
    await wait_inbox(notify, identity, user, 5)
    me = identity.token_for(user)
    first = await notify.stub.ListNotifications(
        pb.ListNotificationsRequest(parent=f"users/{user}", page_size=2), metadata=me
    )
    second = await notify.stub.ListNotifications(
        pb.ListNotificationsRequest(
            parent="users/me", page_size=2, page_token=first.next_page_token
        ),
        metadata=me,
    )
    third = await notify.stub.ListNotifications(
        pb.ListNotificationsRequest(
            parent="users/me", page_size=2, page_token=second.next_page_token
        ),
        metadata=me,
    )
    names = [n.name for page in (first, second, third) for n in page.notifications]
    assert len(names) == 5 and len(set(names)) == 5 and third.next_page_token == ""
    spaces = [n.space for page in (first, second, third) for n in page.notifications]
    assert spaces == [f"spaces/s{i}" for i in reversed(range(5))]  # newest first

    marked = await notify.stub.MarkNotificationsRead(
        pb.MarkNotificationsReadRequest(parent="users/me", names=names[:2]), metadata=me
    )
    assert (marked.marked_count, marked.unread_count) == (2, 3)
    again = await notify.stub.MarkNotificationsRead(
        pb.MarkNotificationsReadRequest(parent="users/me", names=names[:2]), metadata=me
    )
    assert (again.marked_count, again.unread_count) == (0, 3)
    unread = await notify.stub.ListNotifications(
        pb.ListNotificationsRequest(parent="users/me", unread_only=True), metadata=me
    )
    assert len(unread.notifications) == 3
    everything = await notify.stub.MarkNotificationsRead(
        pb.MarkNotificationsReadRequest(
            parent="users/me", before_time=stamp(dt.datetime.now(dt.UTC))
        ),
        metadata=me,
    )
    assert (everything.marked_count, everything.unread_count) == (3, 0)
    count = await notify.stub.GetUnreadCount(
        pb.GetUnreadCountRequest(parent="users/me"), metadata=me
    )
    assert count.unread_count == 0

    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await notify.stub.ListNotifications(
            pb.ListNotificationsRequest(parent=f"users/{actor}"), metadata=me
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(denied.value) == "NOT_OWNER"
    with pytest.raises(grpc.aio.AioRpcError) as mismatch:
        await notify.stub.MarkNotificationsRead(
            pb.MarkNotificationsReadRequest(
                parent="users/me", names=[f"users/{actor}/notifications/1"]
            ),
            metadata=me,
        )
    assert reason(mismatch.value) == "NOTIFICATION_PARENT_MISMATCH"


async def test_preferences_etag_and_filters(
    notify: Notify, identity: Identity, redis_url: str
) -> None:
    user, noisy, friend = await identity.bulk_users(3)
    me = identity.token_for(user)
    got = await notify.stub.GetNotificationPreferences(
        pb.GetNotificationPreferencesRequest(name="users/me/notificationPreferences"), metadata=me
    )
    assert list(got.preferences.disabled_kinds) == [] and not got.preferences.HasField(
        "update_time"
    )
    updated = await notify.stub.UpdateNotificationPreferences(
        pb.UpdateNotificationPreferencesRequest(
            preferences=res.NotificationPreferences(
                name=f"users/{user}/notificationPreferences",
                disabled_kinds=[K.NOTIFICATION_KIND_CO_HOST_INVITATION],
                muted_actors=[f"users/{noisy}"],
                etag=got.preferences.etag,
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["disabled_kinds", "muted_actors"]),
        ),
        metadata=me,
    )
    assert updated.preferences.muted_actors == [f"users/{noisy}"]
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await notify.stub.UpdateNotificationPreferences(
            pb.UpdateNotificationPreferencesRequest(
                preferences=res.NotificationPreferences(
                    name="users/me/notificationPreferences", etag=got.preferences.etag
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["disabled_kinds"]),
            ),
            metadata=me,
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert reason(stale.value) == "ETAG_MISMATCH"

    await publish(
        redis_url,
        "rooms",
        rooms_events.SpeakInvitationEvent(space_id="a", invitee_id=user, inviter_id=noisy),
    )
    await publish(
        redis_url,
        "rooms",
        rooms_events.CoHostInvitationEvent(space_id="b", invitee_id=user, inviter_id=friend),
    )
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpeakInvitationEvent(space_id="c", invitee_id=user, inviter_id=friend),
    )
    got_inbox = await wait_inbox(notify, identity, user, 1)
    await asyncio.sleep(0.5)  # the other two were handled before the third: nothing late
    got_inbox = await inbox(notify, identity, user)
    assert [n.space for n in got_inbox] == ["spaces/c"]


async def test_live_stream_sees_new_notifications(
    notify: Notify, identity: Identity, redis_url: str
) -> None:
    user, actor = await identity.bulk_users(2)
    call = notify.stub.SubscribeNotifications(
        pb.SubscribeNotificationsRequest(parent="users/me"), metadata=identity.token_for(user)
    )
    stream = call.__aiter__()
    first = await asyncio.wait_for(stream.__anext__(), 5)
    assert not first.HasField("notification") and first.unread_count == 0
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpeakInvitationEvent(space_id="live", invitee_id=user, inviter_id=actor),
    )
    second = await asyncio.wait_for(stream.__anext__(), 5)
    assert second.notification.kind == K.NOTIFICATION_KIND_SPEAK_INVITATION
    assert second.notification.space == "spaces/live" and second.unread_count == 1
    call.cancel()


async def test_devices_register_refresh_and_move(notify: Notify, identity: Identity) -> None:
    alice, bob = await identity.bulk_users(2)
    request = pb.RegisterDeviceRequest(
        parent="users/me", platform=res.PLATFORM_FCM, token="fcm-token-1"
    )
    first = await notify.stub.RegisterDevice(request, metadata=identity.token_for(alice))
    again = await notify.stub.RegisterDevice(request, metadata=identity.token_for(alice))
    assert again.device.name == first.device.name
    moved = await notify.stub.RegisterDevice(request, metadata=identity.token_for(bob))
    assert moved.device.name.startswith(f"users/{bob}/devices/")
    await notify.stub.UnregisterDevice(
        pb.UnregisterDeviceRequest(name=moved.device.name), metadata=identity.token_for(bob)
    )
    await notify.stub.UnregisterDevice(
        pb.UnregisterDeviceRequest(name=moved.device.name), metadata=identity.token_for(bob)
    )


async def test_identity_blocks_are_mirrored(
    notify: Notify, identity: Identity, redis_url: str
) -> None:
    """A real BlockUser in identity reaches notify through identity's stream."""
    host, fan = await identity.bulk_users(2)
    await follow(identity, fan, host)
    await identity.stub.BlockUser(
        identity_pb.BlockUserRequest(name=f"users/{fan}"), metadata=identity.token_for(host)
    )

    async def mirrored() -> bool:
        rows = await notify.sql("SELECT 1 FROM blocks WHERE blocker_id = %s", host)
        return bool(rows)

    await eventually(mirrored)
    await publish(
        redis_url,
        "rooms",
        rooms_events.SpeakInvitationEvent(space_id="x", invitee_id=fan, inviter_id=host),
    )
    await asyncio.sleep(0.5)
    assert await inbox(notify, identity, fan) == []
