"""Notify's rules, free of I/O: names, kinds and wording, preferences, backoff, signatures.

Everything here is a pure function or a small value type, so the unit tests exercise it
without servers; :mod:`services.notify.store` and the workers apply it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum

from spaces.notify.v1 import notify_resources_pb2 as resources_pb

from services.common.auth import Principal
from services.common.errors import InvalidArgument, PermissionDenied

__all__ = [
    "SIGNATURE_HEADER",
    "Channel",
    "DeliveryState",
    "Draft",
    "FanoutState",
    "ReminderState",
    "WebhookState",
    "backoff_delay",
    "decode_page_token",
    "encode_page_token",
    "fanout_draft",
    "is_public_address",
    "parse_signature_header",
    "resolve_owner",
    "sign_payload",
    "signature_header",
    "verify_signature",
    "webhook_disabled_draft",
]

Kind = resources_pb.NotificationKind
SIGNATURE_HEADER = "Spaces-Signature"
SIGNATURE_TOLERANCE_S = 300
_SEGMENT = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class FanoutState(IntEnum):
    """Where a fan-out job stands (``fanout_jobs.state``)."""

    PENDING = 1
    DONE = 2
    CANCELED = 3


class ReminderState(IntEnum):
    """``reminders.state``; the values of ScheduledReminder.State."""

    SCHEDULED = 1
    SENT = 2
    CANCELED = 3


class DeliveryState(IntEnum):
    """``deliveries.state``; the values of WebhookDelivery.State."""

    PENDING = 1
    RETRYING = 2
    SUCCEEDED = 3
    DEAD_LETTERED = 4


class WebhookState(IntEnum):
    """``webhooks.state``; the values of Webhook.State."""

    ACTIVE = 1
    DISABLED = 2


class Channel(IntEnum):
    """Where a delivery goes."""

    WEBHOOK = 1
    PUSH = 2


@dataclass(frozen=True)
class Draft:
    """A notification about to be created for one user.

    :ivar user_id: the recipient's id.
    :ivar kind: a ``NotificationKind`` value.
    :ivar title: one-line summary.
    :ivar body: longer text.
    :ivar actor_id: the user who caused it (id), or empty.
    :ivar space_id: the Space it concerns (id), or empty.
    :ivar subject: the resource it is about, when not the Space.
    :ivar dedupe_key: equal keys for one user mean the same notification.
    """

    user_id: str
    kind: int
    title: str
    body: str = ""
    actor_id: str = ""
    space_id: str = ""
    subject: str = ""
    dedupe_key: str = ""

    @property
    def actor(self) -> str:
        """The actor's resource name, or empty."""
        return f"users/{self.actor_id}" if self.actor_id else ""

    @property
    def space(self) -> str:
        """The Space's resource name, or empty."""
        return f"spaces/{self.space_id}" if self.space_id else ""


@dataclass(frozen=True)
class FanoutTemplate:
    """What every follower of a fan-out gets; only the recipient differs.

    :ivar kind: SPACE_STARTED or SPACE_SCHEDULED.
    :ivar title: e.g. "Ada is hosting".
    :ivar body: the Space's title.
    :ivar actor_id: the host.
    :ivar space_id: the Space.
    :ivar dedupe_key: ``started:<space>`` or ``scheduled:<space>``.
    """

    kind: int
    title: str
    body: str
    actor_id: str
    space_id: str
    dedupe_key: str


def fanout_draft(
    kind: int, host_id: str, space_id: str, space_title: str, host_name: str
) -> FanoutTemplate:
    """Return the fan-out template for a Space that started or was scheduled.

    :param host_name: the host's display name, looked up once per fan-out; empty when
        identity could not say (the wording then stays generic).
    """
    who = host_name or "Someone you follow"
    if kind == Kind.NOTIFICATION_KIND_SPACE_STARTED:
        title, key = f"{who} is hosting", f"started:{space_id}"
    else:
        title, key = f"{who} scheduled a Space", f"scheduled:{space_id}"
    return FanoutTemplate(kind, title, space_title, host_id, space_id, key)


def allowed_by_preferences(
    kind: int,
    actor_id: str,
    disabled_kinds: Iterable[int],
    muted_actors: Iterable[str],
) -> bool:
    """Whether a user with these preferences gets a notification of ``kind`` from ``actor_id``."""
    if kind in set(disabled_kinds):
        return False
    return not (actor_id and actor_id in set(muted_actors))


def backoff_delay(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = the first retry).

    Exponential (``base * 2**(attempt-1)``, capped) with "full jitter" on the upper half: the
    delay is uniform in ``[d/2, d]``, so receivers that fail together are not retried in
    lock-step, yet a retry never comes much earlier than the schedule promises.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    delay = min(cap_s, base_s * (2 ** (attempt - 1)))
    jitter = (rng or random).uniform(0.5, 1.0)
    return float(delay * jitter)


def sign_payload(secret: str, timestamp: int, body: bytes) -> str:
    """Return the hex HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, now: float | None = None) -> str:
    """Return the ``Spaces-Signature`` value for ``body``: ``t=<unix>,v1=<hex>``."""
    timestamp = int(time.time() if now is None else now)
    return f"t={timestamp},v1={sign_payload(secret, timestamp, body)}"


def parse_signature_header(value: str) -> tuple[int, list[str]]:
    """Split a ``Spaces-Signature`` header into its timestamp and its v1 signatures.

    :raises ValueError: the header is malformed.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for part in value.split(","):
        key, _, item = part.strip().partition("=")
        if key == "t":
            timestamp = int(item)
        elif key == "v1":
            signatures.append(item)
    if timestamp is None or not signatures:
        raise ValueError("signature header needs t= and v1=")
    return timestamp, signatures


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: int = SIGNATURE_TOLERANCE_S,
) -> bool:
    """What a receiver does: check the HMAC and refuse replays older than ``tolerance_s``."""
    try:
        timestamp, signatures = parse_signature_header(header)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign_payload(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures)


def is_public_address(address: str) -> bool:
    """Whether ``address`` is a globally routable unicast address a webhook may reach.

    Loopback, private (RFC 1918, ULA), link-local (cloud metadata lives there), shared
    (CGNAT), multicast, reserved and unspecified addresses are all refused; IPv4-mapped IPv6
    addresses are judged by their IPv4 address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    ):
        return False
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"):
        return False
    return bool(ip.is_global)


def resolve_owner(parent: str, principal: Principal, field_name: str = "parent") -> str:
    """Return the user id ``parent`` (``users/{user}`` or ``users/me``) stands for.

    :raises PermissionDenied: NOT_OWNER when a user names someone else.
    :raises InvalidArgument: ``users/me`` from a caller that is not a user.
    """
    segment = parent.split("/", 2)[1] if parent.startswith("users/") else ""
    if not _SEGMENT.match(segment):
        raise InvalidArgument(
            f"{field_name} must be users/{{user}}",
            reason="INVALID_ARGUMENT",
            field_violations=[(field_name, "must be users/{user}")],
        )
    if principal.is_user:
        if segment in ("me", principal.user_id):
            return str(principal.user_id)
        raise PermissionDenied("you may only use your own notifications", reason="NOT_OWNER")
    if segment == "me":
        raise InvalidArgument(
            "services must name the user by id",
            reason="INVALID_ARGUMENT",
            field_violations=[(field_name, "users/me needs a user token")],
        )
    return segment


def split_name(name: str, collection: str) -> tuple[str, str]:
    """Split ``users/{user}/<collection>/{id}`` into (user segment, id).

    :raises InvalidArgument: the name does not have that shape.
    """
    parts = name.split("/")
    if (
        len(parts) != 4
        or parts[0] != "users"
        or parts[2] != collection
        or not _SEGMENT.match(parts[1])
        or not _SEGMENT.match(parts[3])
    ):
        raise InvalidArgument(
            f"not a {collection} name: {name!r}",
            field_violations=[("name", f"must be users/{{user}}/{collection}/{{id}}")],
        )
    return parts[1], parts[3]


def user_id_of(name: str) -> str:
    """The id in ``users/{user}`` (or a bare id, as payments' and media's events mix both)."""
    return name.removeprefix("users/")


def space_id_of(name: str) -> str:
    """The Space id in ``spaces/{space}/...``."""
    parts = name.split("/")
    return parts[1] if len(parts) >= 2 and parts[0] == "spaces" else ""


def encode_page_token(kind: str, owner: str, position: str) -> str:
    """An opaque page token bound to one listing and one owner."""
    raw = f"{kind}|{owner}|{position}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, kind: str, owner: str) -> str | None:
    """The position in ``token``; ``None`` for an empty token.

    :raises InvalidArgument: PAGE_TOKEN_INVALID when malformed or made for another listing.
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII input
        raw = ""
    token_kind, _, rest = raw.partition("|")
    token_owner, _, position = rest.partition("|")
    if token_kind != kind or token_owner != owner or not position:
        raise InvalidArgument(
            "page_token is malformed or belongs to another listing",
            reason="PAGE_TOKEN_INVALID",
            field_violations=[("page_token", "not a token of this listing")],
        )
    return position


def page_size(requested: int, default: int = 20, maximum: int = 100) -> int:
    """The page size to use for ``requested`` (0 = default)."""
    return default if requested <= 0 else min(requested, maximum)


def reminder_fire_time(kind: int, start: datetime, lead: timedelta, now: datetime) -> datetime:
    """When a reminder for a Space starting at ``start`` fires.

    The host is reminded at the start; subscribers ``lead`` before it. A time already past
    fires at once (``now``).
    """
    fire = start if kind == resources_pb.REMINDER_KIND_HOST else start - lead
    return max(fire, now)


def reminder_wording(kind: int, space_title: str) -> tuple[str, str]:
    """Title and body of a SPACE_REMINDER."""
    if kind == resources_pb.REMINDER_KIND_HOST:
        return "Your Space is about to start", space_title
    return "A Space you asked to be reminded of is starting", space_title


def webhook_disabled_draft(
    user_id: str, webhook_id: str, url: str, reason: str, disabled_at: datetime
) -> Draft:
    """The owner's notice that their webhook was disabled (one per disabling)."""
    return Draft(
        user_id=user_id,
        kind=Kind.NOTIFICATION_KIND_WEBHOOK_DISABLED,
        title="A webhook of yours was disabled",
        body=f"{url}: {reason}",
        subject=f"users/{user_id}/webhooks/{webhook_id}",
        dedupe_key=f"webhook-disabled:{webhook_id}:{disabled_at.isoformat()}",
    )
