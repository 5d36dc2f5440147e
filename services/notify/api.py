"""The gRPC servicer of ``spaces.notify.v1.NotifyService``.

Each method decodes its request (protovalidate already ran in the interceptor), authorizes
the caller with :func:`services.common.context.current_principal` — a user only ever sees
their own inbox, preferences, webhooks and devices —, applies the rules of
:mod:`services.notify.domain` through the store, and encodes the answer. Errors are
:class:`~services.common.errors.ServiceError` subclasses with the reasons the proto lists.
Webhook secrets are never logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from spaces.notify.v1 import notify_resources_pb2 as resources_pb
from spaces.notify.v1 import notify_service_pb2 as pb
from spaces.notify.v1 import notify_service_pb2_grpc as pb_grpc

from services.common.context import current_principal
from services.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.ids import new_id
from services.notify import domain
from services.notify.convert import (
    delivery_pb,
    device_pb,
    notification_pb,
    preferences_pb,
    reminder_pb,
    webhook_pb,
)
from services.notify.live import LiveHub
from services.notify.settings import NotifySettings
from services.notify.store import LimitReached, PostgresNotifyStore, WebhookRow
from services.notify.webhooks import AddressPolicy, UrlNotAllowed

if TYPE_CHECKING:
    import grpc.aio

    Context = grpc.aio.ServicerContext[Any, Any]

logger = logging.getLogger(__name__)

__all__ = ["NotifyApi"]


class NotifyApi(pb_grpc.NotifyServiceServicer):
    """Implements NotifyService.

    The store and hub need the database and Redis, which open in a start-up hook after the
    server is built, so they are attached by :meth:`attach`.

    :param settings: notify's settings.
    :param policy: which webhook URLs are allowed.
    """

    def __init__(self, settings: NotifySettings, policy: AddressPolicy) -> None:
        self._settings = settings
        self._policy = policy
        self._store_ref: PostgresNotifyStore | None = None
        self._hub_ref: LiveHub | None = None

    def attach(self, store: PostgresNotifyStore, hub: LiveHub) -> None:
        """Give the servicer its storage and live hub (start-up)."""
        self._store_ref = store
        self._hub_ref = hub

    @property
    def _store(self) -> PostgresNotifyStore:
        assert self._store_ref is not None, "NotifyApi used before attach()"
        return self._store_ref

    @property
    def _hub(self) -> LiveHub:
        assert self._hub_ref is not None, "NotifyApi used before attach()"
        return self._hub_ref

    # -- inbox ---------------------------------------------------------------------------

    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, context: Context
    ) -> pb.ListNotificationsResponse:
        user = domain.resolve_owner(request.parent, current_principal())
        listing = "inbox-unread" if request.unread_only else "inbox"
        position = domain.decode_page_token(request.page_token, listing, user)
        before = _int_position(position)
        size = domain.page_size(request.page_size)
        rows = await self._store.list_notifications(user, before, size + 1, request.unread_only)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = domain.encode_page_token(listing, user, str(rows[-1].id))
        return pb.ListNotificationsResponse(
            notifications=[notification_pb(row) for row in rows], next_page_token=token
        )

    async def MarkNotificationsRead(
        self, request: pb.MarkNotificationsReadRequest, context: Context
    ) -> pb.MarkNotificationsReadResponse:
        user = domain.resolve_owner(request.parent, current_principal())
        if request.HasField("before_time"):
            marked, unread = await self._store.mark_read_before(
                user, request.before_time.ToDatetime(dt.UTC)
            )
        else:
            ids: list[int] = []
            for index, name in enumerate(request.names):
                owner, notification = domain.split_name(name, "notifications")
                if owner not in (user, "me") or (owner == "me" and not current_principal().is_user):
                    raise InvalidArgument(
                        "a name is not under parent",
                        reason="NOTIFICATION_PARENT_MISMATCH",
                        field_violations=[(f"names[{index}]", "not under parent")],
                    )
                if notification.isdigit():
                    ids.append(int(notification))  # other ids cannot exist: skipped
            marked, unread = await self._store.mark_read_ids(user, ids)
        return pb.MarkNotificationsReadResponse(marked_count=marked, unread_count=unread)

    async def GetUnreadCount(
        self, request: pb.GetUnreadCountRequest, context: Context
    ) -> pb.GetUnreadCountResponse:
        user = domain.resolve_owner(request.parent, current_principal())
        return pb.GetUnreadCountResponse(unread_count=await self._store.unread_count(user))

    async def SubscribeNotifications(
        self, request: pb.SubscribeNotificationsRequest, context: Context
    ) -> AsyncIterator[pb.SubscribeNotificationsResponse]:
        user = domain.resolve_owner(request.parent, current_principal())
        async with self._hub.subscription(user) as messages:
            # Live from here on: the count read now covers everything published before.
            yield pb.SubscribeNotificationsResponse(
                unread_count=await self._store.unread_count(user)
            )
            async for data in messages:
                notification = resources_pb.Notification.FromString(data)
                yield pb.SubscribeNotificationsResponse(
                    notification=notification,
                    unread_count=await self._store.unread_count(user),
                )

    # -- preferences -------------------------------------------------------------------

    async def GetNotificationPreferences(
        self, request: pb.GetNotificationPreferencesRequest, context: Context
    ) -> pb.GetNotificationPreferencesResponse:
        user = _preferences_owner(request.name, "name")
        row = await self._store.get_preferences(user)
        return pb.GetNotificationPreferencesResponse(preferences=preferences_pb(row))

    async def UpdateNotificationPreferences(
        self, request: pb.UpdateNotificationPreferencesRequest, context: Context
    ) -> pb.UpdateNotificationPreferencesResponse:
        prefs = request.preferences
        user = _preferences_owner(prefs.name, "preferences.name")
        changes: dict[str, list[Any]] = {}
        for path in request.update_mask.paths:
            if path == "disabled_kinds":
                changes[path] = sorted(set(prefs.disabled_kinds))
            elif path == "push_disabled_kinds":
                changes[path] = sorted(set(prefs.push_disabled_kinds))
            elif path == "muted_actors":
                changes[path] = sorted({domain.user_id_of(actor) for actor in prefs.muted_actors})
        expected = _etag_version(prefs.etag) if prefs.etag else None
        row = await self._store.update_preferences(user, changes, expected)
        if row is None:
            raise Aborted(
                "the preferences changed since they were read; read them again",
                reason="ETAG_MISMATCH",
            )
        return pb.UpdateNotificationPreferencesResponse(preferences=preferences_pb(row))

    # -- webhooks ----------------------------------------------------------------------

    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: Context
    ) -> pb.CreateWebhookResponse:
        user = domain.resolve_owner(request.parent, current_principal())
        url = request.webhook.url
        kinds = sorted({int(kind) for kind in request.webhook.kinds})
        fingerprint = hashlib.sha256(f"{url}|{kinds}".encode()).hexdigest()
        request_id = uuid.UUID(request.request_id) if request.request_id else None
        await self._check_url(url, "webhook.url")
        candidate = WebhookRow(
            id=new_id(),
            user_id=user,
            url=url,
            kinds=kinds,
            secret="whsec_" + secrets.token_urlsafe(32),
            state=resources_pb.Webhook.STATE_ACTIVE,
            create_time=dt.datetime.now(dt.UTC),
            request_id=request_id,
            request_fingerprint=fingerprint,
        )
        try:
            row, created = await self._store.create_webhook(candidate, self._settings.webhook_limit)
        except LimitReached:
            raise ResourceExhausted(
                f"you already have {self._settings.webhook_limit} webhooks",
                reason="WEBHOOK_LIMIT_REACHED",
                quota_subject="user",
                quota_description=f"{self._settings.webhook_limit} webhooks per user",
            ) from None
        if not created and row.request_fingerprint != fingerprint:
            raise FailedPrecondition(
                "request_id was used for a different request",
                reason="IDEMPOTENCY_KEY_REUSED",
            )
        return pb.CreateWebhookResponse(webhook=webhook_pb(row), signing_secret=row.secret)

    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: Context
    ) -> pb.ListWebhooksResponse:
        user = domain.resolve_owner(request.parent, current_principal())
        position = domain.decode_page_token(request.page_token, "webhooks", user)
        after = None
        if position is not None:
            stamp, _, webhook_id = position.partition("~")
            try:
                after = (dt.datetime.fromisoformat(stamp), webhook_id)
            except ValueError:
                raise _bad_token() from None
        size = domain.page_size(request.page_size)
        rows = await self._store.list_webhooks(user, after, size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            token = domain.encode_page_token(
                "webhooks", user, f"{last.create_time.isoformat()}~{last.id}"
            )
        return pb.ListWebhooksResponse(
            webhooks=[webhook_pb(row) for row in rows], next_page_token=token
        )

    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: Context
    ) -> pb.DeleteWebhookResponse:
        user, webhook_id = self._owned(request.name, "webhooks")
        if not await self._store.delete_webhook(user, webhook_id):
            raise _webhook_not_found()
        return pb.DeleteWebhookResponse()

    async def EnableWebhook(
        self, request: pb.EnableWebhookRequest, context: Context
    ) -> pb.EnableWebhookResponse:
        user, webhook_id = self._owned(request.name, "webhooks")
        existing = await self._store.get_webhook(user, webhook_id)
        if existing is None:
            raise _webhook_not_found()
        if existing.state == domain.WebhookState.ACTIVE:
            return pb.EnableWebhookResponse(webhook=webhook_pb(existing))
        # The address rules may have changed since it was created (or the name now resolves
        # elsewhere): checked again, as at creation.
        await self._check_url(existing.url)
        row = await self._store.enable_webhook(user, webhook_id)
        if row is None:
            raise _webhook_not_found()
        logger.info("webhook %s of user %s enabled again", webhook_id, user)
        return pb.EnableWebhookResponse(webhook=webhook_pb(row))

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        user, webhook_id = self._owned(request.parent, "webhooks")
        if await self._store.get_webhook(user, webhook_id) is None:
            raise _webhook_not_found()
        listing = f"deliveries-{webhook_id}-{int(request.state)}"
        before = _int_position(domain.decode_page_token(request.page_token, listing, user))
        size = domain.page_size(request.page_size)
        state = int(request.state) or None
        rows = await self._store.list_deliveries(webhook_id, state, before, size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = domain.encode_page_token(listing, user, str(rows[-1].id))
        return pb.ListWebhookDeliveriesResponse(
            deliveries=[delivery_pb(row) for row in rows], next_page_token=token
        )

    # -- devices -----------------------------------------------------------------------

    async def RegisterDevice(
        self, request: pb.RegisterDeviceRequest, context: Context
    ) -> pb.RegisterDeviceResponse:
        user = domain.resolve_owner(request.parent, current_principal())
        try:
            row = await self._store.register_device(
                new_id(), user, request.platform, request.token, self._settings.device_limit
            )
        except LimitReached:
            raise ResourceExhausted(
                f"you already have {self._settings.device_limit} devices; unregister one",
                reason="DEVICE_LIMIT_REACHED",
                quota_subject="user",
                quota_description=f"{self._settings.device_limit} devices per user",
            ) from None
        return pb.RegisterDeviceResponse(device=device_pb(row))

    async def UnregisterDevice(
        self, request: pb.UnregisterDeviceRequest, context: Context
    ) -> pb.UnregisterDeviceResponse:
        user, device_id = self._owned(request.name, "devices")
        await self._store.unregister_device(user, device_id)
        return pb.UnregisterDeviceResponse()

    # -- reminders (internal) ----------------------------------------------------------

    async def ScheduleReminder(
        self, request: pb.ScheduleReminderRequest, context: Context
    ) -> pb.ScheduleReminderResponse:
        space_id = request.space.removeprefix("spaces/")
        user = request.user.removeprefix("users/")
        fire = max(request.fire_time.ToDatetime(dt.UTC), dt.datetime.now(dt.UTC))
        async with self._store.transaction() as tx:
            existing = await tx.reminder(space_id, user)
            if existing is not None and existing.state == domain.ReminderState.SENT:
                raise _already_sent()
            row = await tx.schedule_reminder(space_id, user, request.kind, fire)
        if row is None:
            raise _already_sent()
        return pb.ScheduleReminderResponse(reminder=reminder_pb(row))

    async def CancelReminder(
        self, request: pb.CancelReminderRequest, context: Context
    ) -> pb.CancelReminderResponse:
        space_id = request.space.removeprefix("spaces/")
        user = request.user.removeprefix("users/")
        async with self._store.transaction() as tx:
            existing = await tx.reminder(space_id, user)
            if existing is None:
                return pb.CancelReminderResponse()
            if existing.state == domain.ReminderState.SENT:
                raise _already_sent()
            row = await tx.cancel_reminder(space_id, user) or existing
        return pb.CancelReminderResponse(reminder=reminder_pb(row))

    async def RescheduleSpaceReminders(
        self, request: pb.RescheduleSpaceRemindersRequest, context: Context
    ) -> pb.RescheduleSpaceRemindersResponse:
        space_id = request.space.removeprefix("spaces/")
        fire = max(request.fire_time.ToDatetime(dt.UTC), dt.datetime.now(dt.UTC))
        async with self._store.transaction() as tx:
            moved = await tx.reschedule(space_id, fire)
        return pb.RescheduleSpaceRemindersResponse(moved_count=moved)

    # -- helpers -----------------------------------------------------------------------

    async def _check_url(self, url: str, field_name: str = "name") -> None:
        try:
            await self._policy.resolve(url)
        except UrlNotAllowed as error:
            raise InvalidArgument(
                str(error),
                reason="WEBHOOK_URL_NOT_ALLOWED",
                field_violations=[(field_name, str(error))],
            ) from None

    def _owned(self, name: str, collection: str) -> tuple[str, str]:
        segment, item = domain.split_name(name, collection)
        user = domain.resolve_owner(f"users/{segment}", current_principal(), "name")
        return user, item


def _preferences_owner(name: str, field_name: str) -> str:
    parent = name.removesuffix("/notificationPreferences")
    return domain.resolve_owner(parent, current_principal(), field_name)


def _int_position(position: str | None) -> int | None:
    if position is None:
        return None
    if not position.isdigit():
        raise _bad_token()
    return int(position)


def _etag_version(etag: str) -> int:
    if not etag.startswith("v") or not etag[1:].isdigit():
        # An etag we never issued cannot match the current preferences.
        raise Aborted("the etag does not match the preferences", reason="ETAG_MISMATCH")
    return int(etag[1:])


def _bad_token() -> InvalidArgument:
    return InvalidArgument(
        "page_token is malformed",
        reason="PAGE_TOKEN_INVALID",
        field_violations=[("page_token", "malformed")],
    )


def _webhook_not_found() -> NotFound:
    return NotFound("no such webhook", reason="WEBHOOK_NOT_FOUND")


def _already_sent() -> FailedPrecondition:
    return FailedPrecondition("the reminder already fired", reason="REMINDER_ALREADY_SENT")
