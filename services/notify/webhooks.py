"""The delivery engine: signed webhook POSTs and device pushes, with retries.

Deliveries are rows (``deliveries``) queued in the transaction that created their
notification. Every replica runs :class:`DeliveryEngine`, which leases due rows (``FOR
UPDATE SKIP LOCKED``, pushing ``next_attempt_time`` past the attempt so a replica that dies
mid-attempt has them retried), attempts them concurrently and records the outcome: success,
a retry after exponential backoff with jitter, or — after ``max_attempts`` — dead-lettered.

Webhooks (SSRF): the URL's host is resolved at *every* attempt and every address must be
public (unless the operator allows private ones); the request then goes to the address that
was checked (TLS still verifies the host name via SNI), so DNS cannot swap in an internal
address between check and connect. Redirects are never followed.

Push: one adapter per platform. Adapters that need the internet and credentials are off by
default; an adapter that is off says so at start-up, devices on its platform get no
deliveries queued, and a delivery left over from when it was on is dead-lettered with the
reason — never reported as sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format
from spaces.notify.v1 import notify_resources_pb2 as resources_pb

from services.notify import metrics
from services.notify.convert import notification_pb
from services.notify.domain import (
    SIGNATURE_HEADER,
    Channel,
    DeliveryState,
    backoff_delay,
    is_public_address,
    signature_header,
)
from services.notify.settings import NotifySettings
from services.notify.store import ClaimedDelivery, CreatedNotification, PostgresNotifyStore

logger = logging.getLogger(__name__)

__all__ = [
    "AddressPolicy",
    "ApnsAdapter",
    "AttemptResult",
    "DeliveryEngine",
    "FcmAdapter",
    "PushAdapter",
    "UrlNotAllowed",
    "WebPushAdapter",
    "build_push_adapters",
]

USER_AGENT = "Spaces-Webhooks/1"
FCM_ENDPOINT = "https://fcm.googleapis.com"


class UrlNotAllowed(Exception):
    """A webhook URL (or push endpoint) notify refuses to call."""


@dataclass(frozen=True)
class AttemptResult:
    """The outcome of one attempt.

    :ivar ok: the receiver accepted it.
    :ivar status_code: HTTP status; 0 without an HTTP answer.
    :ivar error: why it failed (``timeout``, ``HTTP 500``...), empty on success.
    :ivar cause: metric label of the failure.
    :ivar permanent: retrying cannot help (dead-letter now).
    :ivar forget_target: the push service says the device is gone.
    :ivar counts_for_health: the outcome says something about the receiver (it counts
        towards disabling a failing webhook, or resets the count).
    """

    ok: bool
    status_code: int = 0
    error: str = ""
    cause: str = ""
    permanent: bool = False
    forget_target: bool = False
    counts_for_health: bool = True


class AddressPolicy:
    """Decides which URLs notify may call.

    :param allow_private: allow loopback/private/link-local addresses (tests, closed nets).
    :param allow_http: allow plain http.
    """

    def __init__(self, *, allow_private: bool, allow_http: bool) -> None:
        self.allow_private = allow_private
        self.allow_http = allow_http

    def check_scheme(self, url: str) -> tuple[str, int]:
        """Return (host, port) of an acceptable URL.

        :raises UrlNotAllowed: bad scheme or no host.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http"):
            raise UrlNotAllowed("only http(s) URLs can receive webhooks")
        if parts.scheme == "http" and not self.allow_http:
            raise UrlNotAllowed("webhook URLs must use https")
        if not parts.hostname:
            raise UrlNotAllowed("the URL has no host")
        if parts.username or parts.password:
            raise UrlNotAllowed("credentials in webhook URLs are not allowed")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise UrlNotAllowed("the URL's port is invalid") from None
        return parts.hostname, port

    async def resolve(self, url: str) -> list[str]:
        """Resolve the URL's host and check every address; return them.

        :raises UrlNotAllowed: scheme refused, no address, or an address not public.
        """
        host, port = self.check_scheme(url)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise UrlNotAllowed(f"the host {host!r} does not resolve") from None
        addresses = sorted({str(info[4][0]) for info in infos})
        if not addresses:
            raise UrlNotAllowed(f"the host {host!r} does not resolve")
        if not self.allow_private:
            for address in addresses:
                if not is_public_address(address):
                    # Every address, not just the first: a name with one public and one
                    # internal address would otherwise reach the internal one.
                    raise UrlNotAllowed(
                        "the URL resolves to a loopback, private or link-local address"
                    )
        return addresses


def webhook_body(delivery_name: str, notification: CreatedNotification) -> bytes:
    """The JSON body of a delivery (proto3 JSON of WebhookPayload), compact."""
    payload = resources_pb.WebhookPayload(
        delivery=delivery_name, notification=notification_pb(notification)
    )
    return json.dumps(json_format.MessageToDict(payload), separators=(",", ":")).encode()


async def post_pinned(
    client: httpx.AsyncClient,
    policy: AddressPolicy,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout_s: float,
) -> AttemptResult:
    """POST ``body`` to ``url`` at an address checked just now; classify the outcome."""
    try:
        addresses = await policy.resolve(url)
    except UrlNotAllowed as error:
        return AttemptResult(False, error=str(error), cause="address_refused")
    target = httpx.URL(url)
    pinned = target.copy_with(host=addresses[0])
    request_headers = {"Host": target.netloc.decode(), **headers}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        response = await client.post(
            pinned,
            content=body,
            headers=request_headers,
            extensions=extensions,
            timeout=timeout_s,
            follow_redirects=False,
        )
    except httpx.TimeoutException:
        return AttemptResult(False, error="timeout", cause="timeout")
    except httpx.ConnectError as error:
        text = "connection refused" if "refused" in str(error).lower() else "connection failed"
        return AttemptResult(False, error=text, cause="connect")
    except httpx.HTTPError as error:
        return AttemptResult(False, error=f"HTTP error: {type(error).__name__}", cause="connect")
    if 200 <= response.status_code < 300:
        return AttemptResult(True, status_code=response.status_code)
    if 300 <= response.status_code < 400:
        return AttemptResult(
            False,
            status_code=response.status_code,
            error=f"HTTP {response.status_code} (redirects are not followed)",
            cause="redirect",
        )
    return AttemptResult(
        False,
        status_code=response.status_code,
        error=f"HTTP {response.status_code}",
        cause="http_status",
    )


class PushAdapter(Protocol):
    """Sends one notification to one device of a platform."""

    platform: int
    enabled: bool
    status: str

    async def send(self, token: str, notification: CreatedNotification) -> AttemptResult:
        """Attempt the push."""
        ...


class ApnsAdapter:
    """Apple Push Notification service: off, and says why.

    APNs only speaks HTTP/2 with token (ES256) or certificate authentication; httpx needs
    the optional ``h2`` package for that, which this build does not ship.
    """

    platform: int = resources_pb.PLATFORM_APNS

    def __init__(self, requested: bool) -> None:
        self.enabled = False
        self.status = (
            "APNs push is off: it needs HTTP/2 (the 'h2' package) and an APNs signing key, "
            "not available in this build"
            + (" (NOTIFY_APNS_ENABLED is set but cannot take effect)" if requested else "")
        )

    async def send(self, token: str, notification: CreatedNotification) -> AttemptResult:
        """Never sends: the adapter is off."""
        return AttemptResult(False, error=self.status, cause="adapter_off", permanent=True)


class FcmAdapter:
    """Firebase Cloud Messaging HTTP v1 (needs a project id and an OAuth2 access token).

    :param client: HTTP client.
    :param project_id: Firebase project.
    :param access_token: OAuth2 bearer token; ``None`` switches the adapter off.
    :param timeout_s: request timeout.
    :param endpoint: the FCM API's base URL (an operator's egress proxy, or a test server).
    """

    platform: int = resources_pb.PLATFORM_FCM

    def __init__(
        self,
        client: httpx.AsyncClient,
        project_id: str,
        access_token: str | None,
        timeout_s: float,
        endpoint: str = FCM_ENDPOINT,
    ) -> None:
        self._client = client
        self._project_id = project_id
        self._token = access_token
        self._timeout_s = timeout_s
        self._endpoint = endpoint.rstrip("/")
        self.enabled = bool(project_id and access_token)
        self.status = (
            f"FCM push is on (project {project_id})"
            if self.enabled
            else "FCM push is off: set NOTIFY_FCM_PROJECT_ID and NOTIFY_FCM_ACCESS_TOKEN "
            "(it calls fcm.googleapis.com)"
        )

    async def send(self, token: str, notification: CreatedNotification) -> AttemptResult:
        """POST one message to the FCM v1 API."""
        if not self.enabled:
            return AttemptResult(False, error=self.status, cause="adapter_off", permanent=True)
        url = f"{self._endpoint}/v1/projects/{self._project_id}/messages:send"
        message = {
            "message": {
                "token": token,
                "notification": {"title": notification.title, "body": notification.body},
                "data": {
                    "notification": f"users/{notification.user_id}/notifications/{notification.id}"
                },
            }
        }
        try:
            response = await self._client.post(
                url,
                json=message,
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=self._timeout_s,
                follow_redirects=False,
            )
        except httpx.HTTPError as error:
            return AttemptResult(False, error=type(error).__name__, cause="connect")
        if response.status_code == 200:
            return AttemptResult(True, status_code=200)
        gone = response.status_code == 404 or "UNREGISTERED" in response.text
        return AttemptResult(
            False,
            status_code=response.status_code,
            error=f"HTTP {response.status_code}",
            cause="http_status",
            permanent=gone,
            forget_target=gone,
        )


class WebPushAdapter:
    """Web Push (RFC 8030) with VAPID (RFC 8292), sent without a payload.

    A push without payload needs no message encryption (RFC 8291): the service worker
    wakes up and fetches the inbox. The subscription's endpoint is checked like a webhook
    URL, since users choose it.

    :param client: HTTP client.
    :param policy: address policy for endpoints.
    :param private_key_pem: VAPID key (P-256 PEM); ``None`` switches the adapter off.
    :param subject: VAPID ``sub``.
    :param timeout_s: request timeout.
    """

    platform: int = resources_pb.PLATFORM_WEB_PUSH

    def __init__(
        self,
        client: httpx.AsyncClient,
        policy: AddressPolicy,
        private_key_pem: str | None,
        subject: str,
        timeout_s: float,
    ) -> None:
        self._client = client
        self._policy = policy
        self._subject = subject
        self._timeout_s = timeout_s
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._public = ""
        if private_key_pem:
            key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("the VAPID key must be an EC P-256 private key")
            self._key = key
            raw = key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            self._public = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        self.enabled = self._key is not None
        self.status = (
            "Web Push is on"
            if self.enabled
            else "Web Push is off: set NOTIFY_WEBPUSH_VAPID_PRIVATE_KEY (it calls the "
            "browsers' push services on the internet)"
        )

    async def send(self, token: str, notification: CreatedNotification) -> AttemptResult:
        """POST an empty push message to the subscription's endpoint."""
        if self._key is None:
            return AttemptResult(False, error=self.status, cause="adapter_off", permanent=True)
        try:
            endpoint = str(json.loads(token)["endpoint"])
        except (ValueError, KeyError, TypeError):
            return AttemptResult(
                False, error="malformed subscription", permanent=True, forget_target=True
            )
        parts = urlsplit(endpoint)
        claims = {
            "aud": f"{parts.scheme}://{parts.netloc}",
            "exp": int(time.time()) + 12 * 3600,
            "sub": self._subject,
        }
        vapid = jwt.encode(claims, self._key, algorithm="ES256")
        result = await post_pinned(
            self._client,
            self._policy,
            endpoint,
            b"",
            {"TTL": "86400", "Authorization": f"vapid t={vapid},k={self._public}"},
            self._timeout_s,
        )
        if result.status_code in (404, 410):
            return AttemptResult(
                False,
                status_code=result.status_code,
                error=result.error,
                cause=result.cause,
                permanent=True,
                forget_target=True,
            )
        return result


def build_push_adapters(
    settings: NotifySettings, client: httpx.AsyncClient, policy: AddressPolicy
) -> dict[int, PushAdapter]:
    """The adapters per platform, each logging whether it is on and why not."""
    adapters: list[PushAdapter] = [
        ApnsAdapter(settings.apns_enabled),
        FcmAdapter(
            client,
            settings.fcm_project_id,
            settings.fcm_access_token.get_secret_value() if settings.fcm_access_token else None,
            settings.webhook_timeout_s,
            settings.fcm_endpoint,
        ),
        WebPushAdapter(
            client,
            policy,
            settings.webpush_vapid_private_key.get_secret_value()
            if settings.webpush_vapid_private_key
            else None,
            settings.webpush_vapid_subject,
            settings.webhook_timeout_s,
        ),
    ]
    for adapter in adapters:
        (logger.info if adapter.enabled else logger.warning)("%s", adapter.status)
    return {adapter.platform: adapter for adapter in adapters}


class DeliveryEngine:
    """Attempts due deliveries until cancelled.

    :param store: storage.
    :param client: HTTP client (no redirects are followed whatever its defaults).
    :param policy: address policy.
    :param adapters: push adapters by platform.
    :param settings: retry, timeout and concurrency settings.
    """

    def __init__(
        self,
        store: PostgresNotifyStore,
        client: httpx.AsyncClient,
        policy: AddressPolicy,
        adapters: Mapping[int, PushAdapter],
        settings: NotifySettings,
    ) -> None:
        self._store = store
        self._client = client
        self._policy = policy
        self._adapters = dict(adapters)
        self._settings = settings
        self._lease_s = settings.webhook_timeout_s + 30.0

    async def run(self) -> None:
        """Loop until cancelled."""
        while True:
            try:
                if not await self.run_once():
                    await asyncio.sleep(self._settings.delivery_poll_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the delivery loop failed; retrying")
                await asyncio.sleep(1.0)

    async def run_once(self) -> int:
        """Attempt one batch of due deliveries concurrently; return how many."""
        claimed = await self._store.claim_deliveries(
            self._settings.delivery_concurrency, self._lease_s
        )
        if claimed:
            await asyncio.gather(*(self._deliver(d) for d in claimed))
        return len(claimed)

    async def _deliver(self, delivery: ClaimedDelivery) -> None:
        channel = "webhook" if delivery.channel == Channel.WEBHOOK else "push"
        started = time.perf_counter()
        try:
            result = await self._attempt(delivery)
        except Exception as error:
            logger.exception("delivery %d failed unexpectedly", delivery.id)
            result = AttemptResult(
                False, error=f"internal error: {type(error).__name__}", counts_for_health=False
            )
        attempts = delivery.attempt_count + 1
        if result.ok:
            state, delay = DeliveryState.SUCCEEDED, None
        elif result.permanent or attempts >= self._settings.webhook_max_attempts:
            state, delay = DeliveryState.DEAD_LETTERED, None
        else:
            state = DeliveryState.RETRYING
            delay = backoff_delay(
                attempts,
                base_s=self._settings.webhook_backoff_base_s,
                cap_s=self._settings.webhook_backoff_cap_s,
            )
        metrics.DELIVERY_ATTEMPT_SECONDS.labels(channel).observe(time.perf_counter() - started)
        metrics.DELIVERIES.labels(channel, state.name.lower()).inc()
        if not result.ok and delivery.channel == Channel.WEBHOOK:
            metrics.WEBHOOK_FAILURES.labels(result.cause or "other").inc()
        await self._store.record_attempt(
            delivery.id,
            state=state,
            status_code=result.status_code,
            error=result.error,
            next_attempt_in_s=delay,
        )
        if result.forget_target and delivery.channel == Channel.PUSH:
            await self._store.remove_device(delivery.target_id)
        if delivery.channel == Channel.WEBHOOK and result.counts_for_health:
            await self._record_webhook_health(delivery, result)

    async def _record_webhook_health(
        self, delivery: ClaimedDelivery, result: AttemptResult
    ) -> None:
        if result.ok:
            await self._store.record_webhook_success(delivery.target_id)
            return
        disabled = await self._store.record_webhook_failure(
            delivery.target_id, result.error, self._settings.webhook_disable_after_failures
        )
        if disabled is not None:
            metrics.WEBHOOKS_DISABLED.inc()
            logger.warning(
                "webhook %s of user %s disabled: %s",
                disabled.id,
                disabled.user_id,
                disabled.disabled_reason,
            )

    async def _attempt(self, delivery: ClaimedDelivery) -> AttemptResult:
        notification = delivery.notification
        if delivery.channel == Channel.WEBHOOK:
            if delivery.url is None or delivery.secret is None:
                return AttemptResult(
                    False, error="webhook deleted", permanent=True, counts_for_health=False
                )
            if not delivery.webhook_active:
                return AttemptResult(
                    False, error="webhook disabled", permanent=True, counts_for_health=False
                )
            name = (
                f"users/{notification.user_id}/webhooks/{delivery.target_id}"
                f"/deliveries/{delivery.id}"
            )
            body = webhook_body(name, notification)
            headers = {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                SIGNATURE_HEADER: signature_header(delivery.secret, body),
            }
            return await post_pinned(
                self._client,
                self._policy,
                delivery.url,
                body,
                headers,
                self._settings.webhook_timeout_s,
            )
        if delivery.platform is None or delivery.token is None:
            return AttemptResult(False, error="device unregistered", permanent=True)
        adapter = self._adapters.get(delivery.platform)
        if adapter is None or not adapter.enabled:
            status = adapter.status if adapter is not None else "no adapter for this platform"
            return AttemptResult(False, error=status, cause="adapter_off", permanent=True)
        return await adapter.send(delivery.token, notification)
