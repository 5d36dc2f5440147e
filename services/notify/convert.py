"""Rows to API messages."""

from __future__ import annotations

import datetime as dt
import logging

from google.protobuf import timestamp_pb2
from spaces.notify.v1 import notify_resources_pb2 as resources_pb

from services.notify.store import (
    CreatedNotification,
    DeliveryRow,
    DeviceRow,
    PreferencesRow,
    ReminderRow,
    WebhookRow,
)

logger = logging.getLogger(__name__)

__all__ = [
    "delivery_pb",
    "device_pb",
    "notification_pb",
    "preferences_pb",
    "reminder_pb",
    "timestamp",
    "webhook_pb",
]


def timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of an aware datetime."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def notification_pb(row: CreatedNotification) -> resources_pb.Notification:
    """The Notification resource of a row."""
    return resources_pb.Notification(
        name=f"users/{row.user_id}/notifications/{row.id}",
        kind=row.kind,  # type: ignore[arg-type]
        title=row.title,
        body=row.body,
        actor=row.actor,
        space=row.space,
        subject=row.subject,
        create_time=timestamp(row.create_time),
        read=row.read,
    )


def preferences_pb(row: PreferencesRow) -> resources_pb.NotificationPreferences:
    """The NotificationPreferences resource, its etag the row version."""
    prefs = resources_pb.NotificationPreferences(
        name=f"users/{row.user_id}/notificationPreferences",
        disabled_kinds=sorted(row.disabled_kinds),  # type: ignore[arg-type]
        push_disabled_kinds=sorted(row.push_disabled_kinds),  # type: ignore[arg-type]
        muted_actors=[f"users/{actor}" for actor in sorted(row.muted_actors)],
        etag=f"v{row.version}",
    )
    if row.update_time is not None:
        prefs.update_time.CopyFrom(timestamp(row.update_time))
    return prefs


def webhook_pb(row: WebhookRow) -> resources_pb.Webhook:
    """The Webhook resource (never the secret)."""
    webhook = resources_pb.Webhook(
        name=f"users/{row.user_id}/webhooks/{row.id}",
        url=row.url,
        kinds=sorted(row.kinds),  # type: ignore[arg-type]
        state=row.state,  # type: ignore[arg-type]
        create_time=timestamp(row.create_time),
        consecutive_failures=row.consecutive_failures,
        disabled_reason=row.disabled_reason,
    )
    if row.disabled_time is not None:
        webhook.disable_time.CopyFrom(timestamp(row.disabled_time))
    return webhook


def delivery_pb(row: DeliveryRow) -> resources_pb.WebhookDelivery:
    """The WebhookDelivery resource."""
    delivery = resources_pb.WebhookDelivery(
        name=f"users/{row.user_id}/webhooks/{row.target_id}/deliveries/{row.id}",
        notification=f"users/{row.user_id}/notifications/{row.notification_id}",
        kind=row.kind,  # type: ignore[arg-type]
        state=row.state,  # type: ignore[arg-type]
        attempt_count=row.attempt_count,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        create_time=timestamp(row.create_time),
    )
    if row.last_attempt_time is not None:
        delivery.last_attempt_time.CopyFrom(timestamp(row.last_attempt_time))
    if row.state in (
        resources_pb.WebhookDelivery.STATE_PENDING,
        resources_pb.WebhookDelivery.STATE_RETRYING,
    ):
        delivery.next_attempt_time.CopyFrom(timestamp(row.next_attempt_time))
    return delivery


def device_pb(row: DeviceRow) -> resources_pb.Device:
    """The Device resource."""
    return resources_pb.Device(
        name=f"users/{row.user_id}/devices/{row.id}",
        platform=row.platform,  # type: ignore[arg-type]
        token=row.token,
        create_time=timestamp(row.create_time),
        refresh_time=timestamp(row.refresh_time),
    )


def reminder_pb(row: ReminderRow) -> resources_pb.ScheduledReminder:
    """The ScheduledReminder message."""
    return resources_pb.ScheduledReminder(
        reminder=f"spaces/{row.space_id}/reminders/{row.user_id}",
        user=f"users/{row.user_id}",
        kind=row.kind,  # type: ignore[arg-type]
        fire_time=timestamp(row.fire_time),
        state=row.state,  # type: ignore[arg-type]
    )
