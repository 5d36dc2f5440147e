"""Authorization matrix over every app-facing RPC, against the real processes (straight gRPC).

Calls go straight to each service's gRPC port, exactly what the gateway forwards (it passes
``Authorization`` through untouched and the services decide); a few of them are repeated
through the gateway to check the HTTP side (401/403 and a JSON ``google.rpc.Status``).

1. **Credentials.** The descriptors are walked: every method of identity, rooms, notify,
   payments (and media, once built) whose ``(spaces.common.v1.access)`` is USER or PUBLIC
   and that has a ``google.api.http`` rule is called with no token (USER only), an expired
   token signed by identity's real key, an ``alg=none`` token, a token signed by another key
   under identity's key id, an HS256 token keyed with identity's public key (algorithm
   confusion), a token for the wrong audience, a refresh token in place of an access token,
   and a service token keyed with a wrong secret. Every one must be UNAUTHENTICATED.
2. **Roles and ownership.** With real tokens: every role in a live Space (host, co-host,
   speaker, listener with a raised hand, outsider) against every moderation RPC, a private
   Space against an outsider, and another user's token against every user-owned resource
   (profile, blocks, notifications, webhooks, devices, balance, ledger, payouts, tickets,
   reminders). Each refusal must carry the code and ErrorInfo reason the proto documents.
   Every app-facing method must appear in this table or in the list of methods any
   signed-in user may call, so a new RPC cannot slip past the matrix.
3. **Nothing changed.** A snapshot of everything the callers could have touched, read
   through the API with the owners' tokens, is equal before and after.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import httpx
import jwt
import psycopg
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pool, field_mask_pb2, timestamp_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.json_format import MessageToDict
from spaces.common.v1 import money_pb2, options_pb2
from spaces.identity.v1 import identity_resources_pb2 as identity_res
from spaces.notify.v1 import notify_resources_pb2 as notify_res
from spaces.payments.v1 import payments_resources_pb2 as payments_res
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_res

from services.common.auth import ACCESS_TOKEN_AUDIENCE, ACCESS_TOKEN_ISSUER
from tests.helpers.tokens import SigningKey, hs256_with_public_key, unsigned_token
from tests.resilience.harness import (
    Api,
    CallResult,
    User,
    eventually_ok,
    signup,
)
from tools.devstack import Stack

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@dataclass
class World:
    """The accounts, Spaces and resources the matrix aims at."""

    api: Api
    stack: Stack
    users: dict[str, User]
    live: str  # a live Space hosted by "host", everyone may see it
    scheduled: str  # a scheduled, ticketed Space hosted by "host"
    private: str  # a live invited-only Space hosted by "host2"
    ticket: str  # the listener's ticket to `scheduled`
    reminder: str  # listener's reminder for `scheduled`
    identity_kid: str
    identity_key: Any = field(repr=False)
    webhook: str = "w1"  # host's webhook (made by the notify part)
    device: str = "d1"  # host's device (made by the notify part)

    def space(self, key: str) -> str:
        return f"spaces/{getattr(self, key)}"

    def participant(self, space_key: str, user: str) -> str:
        return f"{self.space(space_key)}/participants/{self.users[user].id}"


def _ts(delta: timedelta) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromSeconds(int(time.time() + delta.total_seconds()))
    return stamp


def _rid() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
async def world(stack: Stack) -> AsyncIterator[World]:
    api = Api(stack)
    names = ["host", "cohost", "speaker", "listener", "outsider", "host2"]
    users = {name: await signup(api, name) for name in names}
    u = users
    # First, so payments has long learned of it when the offering is made.
    scheduled = await api.ok(
        "RoomsService.CreateSpace",
        token=u["host"].token,
        space=rooms_res.Space(
            title="matrix ticketed",
            ticketed=True,
            scheduled_start_time=_ts(timedelta(days=2)),
        ),
        request_id=_rid(),
    )
    scheduled_name = scheduled.space.name
    live = await api.ok(
        "RoomsService.CreateSpace",
        token=u["host"].token,
        space=rooms_res.Space(title="matrix live"),
        request_id=_rid(),
    )
    live_name = live.space.name
    for who in ("cohost", "speaker", "listener"):
        await api.ok(
            "RoomsService.JoinSpace", token=u[who].token, name=live_name, request_id=_rid()
        )
    await api.ok(
        "RoomsService.AddCoHost",
        token=u["host"].token,
        name=f"{live_name}/participants/{u['cohost'].id}",
    )
    await api.ok("RoomsService.AcceptCoHostInvitation", token=u["cohost"].token, name=live_name)
    await api.ok(
        "RoomsService.InviteToSpeak",
        token=u["host"].token,
        name=f"{live_name}/participants/{u['speaker'].id}",
    )
    await api.ok("RoomsService.AcceptSpeakInvitation", token=u["speaker"].token, name=live_name)
    await api.ok("RoomsService.RequestToSpeak", token=u["listener"].token, name=live_name)

    price = money_pb2.Money(amount_minor=500, currency_code="USD")
    # Payments learns of the Space from rooms' events, a moment later.
    await eventually_ok(
        api,
        "PaymentsService.CreateTicketOffering",
        timeout=30,
        token=u["host"].token,
        parent=scheduled_name,
        ticket_offering=payments_res.TicketOffering(price=price, capacity=10),
        request_id=_rid(),
    )
    ticket = await api.ok(
        "PaymentsService.PurchaseTicket",
        token=u["listener"].token,
        parent=scheduled_name,
        request_id=_rid(),
        payment_method="tok_visa",
        price=price,
    )
    reminder = await api.ok(
        "RoomsService.CreateReminder", token=u["listener"].token, parent=scheduled_name
    )
    private = await api.ok(
        "RoomsService.CreateSpace",
        token=u["host2"].token,
        space=rooms_res.Space(
            title="matrix private", visibility=rooms_res.SPACE_VISIBILITY_INVITED_ONLY
        ),
        request_id=_rid(),
    )
    # The outsider follows host2, so a leak through the discovery feed would show.
    await api.ok("IdentityService.FollowUser", token=u["outsider"].token, name=u["host2"].name)
    kid = jwt.get_unverified_header(u["host"].token)["kid"]
    with psycopg.connect(stack.database_url) as conn:
        row = conn.execute(
            "SELECT private_pem FROM identity.signing_keys WHERE kid = %s", (kid,)
        ).fetchone()
    assert row is not None, "identity's signing key is not where the matrix expects it"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(bytes(row[0]), password=None)
    world = World(
        api=api,
        stack=stack,
        users=users,
        live=live_name.split("/")[1],
        scheduled=scheduled_name.split("/")[1],
        private=private.space.name.split("/")[1],
        ticket=ticket.ticket.name.split("/")[-1],
        reminder=reminder.reminder.name.split("/")[-1],
        identity_kid=kid,
        identity_key=key,
    )
    try:
        yield world
    finally:
        await api.close()


# --- the app-facing methods ---------------------------------------------------------------


def _http_rule(method: MethodDescriptor) -> Any:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return None
    return options.Extensions[annotations_pb2.http]


def _path_of(rule: Any) -> str:
    for verb in ("get", "post", "patch", "put", "delete"):
        if getattr(rule, verb):
            return str(getattr(rule, verb))
    return str(rule.custom.path)


def app_facing_methods(stack: Stack) -> list[MethodDescriptor]:
    """USER and PUBLIC methods with an HTTP rule, of every service the stack runs."""
    pool = descriptor_pool.Default()
    found: list[MethodDescriptor] = []
    for service_name in sorted(stack.services):
        if stack.services[service_name].grpc_port is None:
            continue
        file = pool.FindFileByName(f"spaces/{service_name}/v1/{service_name}_service.proto")
        for service in file.services_by_name.values():
            for method in service.methods:
                access = method.GetOptions().Extensions[options_pb2.access]
                if access == options_pb2.ACCESS_INTERNAL or _http_rule(method) is None:
                    continue
                found.append(method)
    return found


_COLLECTION_IDS = {
    "spaces": lambda w: w.live,
    "participants": lambda w: w.users["listener"].id,
    "users": lambda w: w.users["host"].id,
    "relationships": lambda w: w.users["listener"].id,
    "tickets": lambda w: w.ticket,
    "webhooks": lambda w: w.webhook,
    "devices": lambda w: w.device,
    "reminders": lambda w: w.reminder,
    "payouts": lambda w: "p1",
    "recordings": lambda w: "r1",
    "mediaNodes": lambda w: "media-1",
    "sessions": lambda w: "s1",
}


def request_from_path(world: World, method: MethodDescriptor) -> Any:
    """A request whose path fields name the world's real resources (the live Space, ...)."""
    request = Api.request(method)
    path = _path_of(_http_rule(method))
    for chunk in path.split("{")[1:]:
        binding = chunk.split("}")[0]
        field_path, _, pattern = binding.partition("=")
        segments = (pattern or "*").split("/")
        value: list[str] = []
        for index, segment in enumerate(segments):
            if segment == "*":
                collection = segments[index - 1] if index else "spaces"
                value.append(_COLLECTION_IDS[collection](world))
            else:
                value.append(segment)
        target = request
        *parents, leaf = field_path.split(".")
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, "/".join(value))
    return request


# --- 1. credentials -----------------------------------------------------------------------


def bad_credentials(world: World) -> dict[str, str | None]:
    """Every kind of token that must not authenticate anyone (None: no token at all)."""
    host = world.users["host"]
    real = SigningKey(world.identity_kid, "EdDSA", world.identity_key)
    now = int(time.time())
    expired = jwt.encode(
        {
            "iss": ACCESS_TOKEN_ISSUER,
            "aud": ACCESS_TOKEN_AUDIENCE,
            "sub": host.id,
            "iat": now - 7200,
            "exp": now - 3600,
            "jti": uuid.uuid4().hex,
        },
        world.identity_key,
        algorithm="EdDSA",
        headers={"kid": world.identity_kid},
    )
    forged_service = jwt.encode(
        {
            "iss": "spaces-rooms",
            "aud": "spaces-internal",
            "sub": "service:rooms",
            "iat": now,
            "exp": now + 60,
            "jti": uuid.uuid4().hex,
        },
        "not-the-internal-secret-0123456789abcdef0123456789",
        algorithm="HS256",
    )
    return {
        "no token": None,
        "expired (identity's key)": expired,
        "alg=none": unsigned_token(host.id, kid=world.identity_kid),
        "other key, identity's kid": SigningKey.ed25519(world.identity_kid).mint(host.id),
        "other key, unknown kid": SigningKey.ed25519("rogue-kid").mint(host.id),
        "HS256 keyed with identity's public key": hs256_with_public_key(real, host.id),
        "wrong audience (identity's key)": real.mint(host.id, aud="some-other-api"),
        "refresh token as access token": host.refresh_token,
        "service token, wrong secret": forged_service,
        "garbage": "not.a.jwt",
    }


SERVICES = [
    "identity",
    "rooms",
    "notify",
    "payments",
    "media",
]


@pytest.mark.parametrize("service", SERVICES)
async def test_every_bad_credential_is_unauthenticated_on_every_app_facing_rpc(
    world: World, service: str
) -> None:
    methods = [
        m for m in app_facing_methods(world.stack) if m.full_name.startswith(f"spaces.{service}.")
    ]
    assert len(methods) >= 5, [m.full_name for m in methods]
    before = await snapshot(world)
    credentials = bad_credentials(world)
    failures: list[str] = []
    calls = 0
    started = time.monotonic()
    for method in methods:
        access = method.GetOptions().Extensions[options_pb2.access]
        request = request_from_path(world, method)
        for label, token in credentials.items():
            if token is None and access == options_pb2.ACCESS_PUBLIC:
                continue  # anonymous use of a public RPC is allowed
            result = await world.api.call(method, request, token=token, timeout=10)
            calls += 1
            if result.code != UNAUTHENTICATED:
                failures.append(f"{method.full_name} with {label}: {result.code.name}")
    elapsed = time.monotonic() - started
    print(
        f"\nauthz credentials {service}: {len(methods)} app-facing RPCs"
        f" x {len(credentials)} credentials"
        f" = {calls} calls, {len(failures)} let through, {elapsed:.1f} s"
    )
    assert not failures, "\n".join(failures)
    assert await snapshot(world) == before


# --- 2. roles and ownership ---------------------------------------------------------------

ROLES = ("host", "cohost", "speaker", "listener", "outsider")


@dataclass(frozen=True)
class Case:
    """A call some callers may not make: who is refused, and how."""

    method: str
    fields: Any  # World -> dict of request fields
    refused: tuple[str, ...]
    code: grpc.StatusCode
    reason: str


def _on(space: str, who: str) -> Any:
    return lambda w: {"name": w.participant(space, who)}


def _space(key: str = "live", **extra: Any) -> Any:
    return lambda w: {"name": w.space(key), **extra}


def _users(path: str) -> Any:
    """``path`` with {host} replaced by host's id: a resource the host owns."""
    return lambda w: path.format(host=w.users["host"].id, ticket=w.ticket)


NOT_MODS = ("speaker", "listener", "outsider")
NOT_HOSTS = ("cohost", "speaker", "listener", "outsider")
OTHERS = ("cohost", "listener", "outsider")  # anyone but the owner (host)
PRIVATE_OUTSIDER = ("outsider",)


def _price() -> money_pb2.Money:
    return money_pb2.Money(amount_minor=700, currency_code="USD")


CASES: list[Case] = [
    # rooms: the live Space, each role against each moderation RPC
    Case("RoomsService.EndSpace", _space(), NOT_HOSTS, DENIED, "NOT_HOST"),
    Case(
        "RoomsService.UpdateSpace",
        lambda w: {
            "space": rooms_res.Space(name=w.space("live"), title="hijacked"),
            "update_mask": field_mask_pb2.FieldMask(paths=["title"]),
        },
        NOT_HOSTS,
        DENIED,
        "NOT_HOST",
    ),
    Case("RoomsService.StartSpace", _space("scheduled"), NOT_HOSTS, DENIED, "NOT_HOST"),
    Case("RoomsService.CancelSpace", _space("scheduled"), NOT_HOSTS, DENIED, "NOT_HOST"),
    Case(
        "RoomsService.ApproveSpeaker",
        _on("live", "listener"),
        NOT_MODS,
        DENIED,
        "NOT_MODERATOR",
    ),
    Case("RoomsService.DenySpeaker", _on("live", "listener"), NOT_MODS, DENIED, "NOT_MODERATOR"),
    Case("RoomsService.InviteToSpeak", _on("live", "listener"), NOT_MODS, DENIED, "NOT_MODERATOR"),
    Case(
        "RoomsService.RevokeSpeaker",
        _on("live", "speaker"),
        ("listener", "outsider"),
        DENIED,
        "NOT_MODERATOR",
    ),
    Case("RoomsService.AddCoHost", _on("live", "speaker"), NOT_HOSTS, DENIED, "NOT_HOST"),
    Case(
        "RoomsService.RemoveCoHost",
        _on("live", "cohost"),
        ("speaker", "listener", "outsider"),
        DENIED,
        "NOT_HOST",
    ),
    Case("RoomsService.MuteParticipant", _on("live", "speaker"), NOT_MODS, DENIED, "NOT_MODERATOR"),
    Case(
        "RoomsService.MuteParticipant",
        _on("live", "host"),
        ("cohost",),
        DENIED,
        "CANNOT_MODERATE_TARGET",
    ),
    Case(
        "RoomsService.RemoveParticipant",
        _on("live", "listener"),
        NOT_MODS,
        DENIED,
        "NOT_MODERATOR",
    ),
    Case(
        "RoomsService.RemoveParticipant",
        _on("live", "host"),
        ("cohost",),
        DENIED,
        "CANNOT_MODERATE_TARGET",
    ),
    Case(
        "RoomsService.SetSpeakPermission",
        _space(speak_permission=rooms_res.SPEAK_PERMISSION_INVITED_ONLY),
        NOT_MODS,
        DENIED,
        "NOT_MODERATOR",
    ),
    Case(
        "RoomsService.InviteUsers",
        lambda w: {"name": w.space("live"), "users": [w.users["outsider"].name]},
        NOT_MODS,
        DENIED,
        "NOT_MODERATOR",
    ),
    Case("RoomsService.CreateJoinLink", _space(), NOT_MODS, DENIED, "NOT_MODERATOR"),
    Case("RoomsService.PinMessage", _space(text="pwned"), NOT_MODS, DENIED, "NOT_MODERATOR"),
    Case(
        "RoomsService.ListParticipants",
        lambda w: {"parent": w.space("live"), "hand_raised_only": True},
        NOT_MODS,
        DENIED,
        "NOT_MODERATOR",
    ),
    Case(
        "RoomsService.DeleteReminder",
        lambda w: {"name": f"{w.space('scheduled')}/reminders/{w.reminder}"},
        ("host", "outsider"),
        DENIED,
        "NOT_SELF",
    ),
    Case(
        "RoomsService.GetDiscoveryFeed",
        lambda w: {"name": f"users/{w.users['host'].id}/discoveryFeed"},
        OTHERS,
        DENIED,
        "NOT_SELF",
    ),
    # rooms: a private Space hides itself from someone not invited
    *[
        Case(method, fields, PRIVATE_OUTSIDER, NOT_FOUND, "SPACE_NOT_FOUND")
        for method, fields in [
            ("RoomsService.GetSpace", _space("private")),
            ("RoomsService.JoinSpace", _space("private", request_id="")),
            ("RoomsService.ListParticipants", lambda w: {"parent": w.space("private")}),
            ("RoomsService.GetParticipant", _on("private", "host2")),
            ("RoomsService.WatchSpace", _space("private")),
            ("RoomsService.RequestToSpeak", _space("private")),
            ("RoomsService.SendReaction", _space("private", emoji=rooms_res.EMOJI_HEART)),
            ("RoomsService.ReportSpace", _space("private", reason=1)),
        ]
    ],
    # identity: another user's profile and blocks
    Case(
        "IdentityService.UpdateUser",
        lambda w: {
            "user": identity_res.User(name=w.users["host"].name, display_name="hijacked"),
            "update_mask": field_mask_pb2.FieldMask(paths=["display_name"]),
        },
        OTHERS,
        DENIED,
        "NOT_SELF",
    ),
    Case(
        "IdentityService.ListBlockedUsers",
        lambda w: {"parent": w.users["host"].name},
        OTHERS,
        DENIED,
        "NOT_SELF",
    ),
    Case(
        "IdentityService.GetRelationship",
        lambda w: {"name": f"{w.users['host'].name}/relationships/{w.users['cohost'].id}"},
        ("listener", "outsider"),
        DENIED,
        "NOT_SELF",
    ),
    Case(
        "IdentityService.Logout",
        lambda w: {"refresh_token": w.users["host"].refresh_token},
        OTHERS,
        DENIED,
        "REFRESH_TOKEN_NOT_OWNED",
    ),
    # notify: everything under users/{host}
    *[
        Case(method, fields, OTHERS, DENIED, "NOT_OWNER")
        for method, fields in [
            ("NotifyService.ListNotifications", lambda w: {"parent": w.users["host"].name}),
            (
                "NotifyService.MarkNotificationsRead",
                lambda w: {"parent": w.users["host"].name, "before_time": _ts(timedelta(0))},
            ),
            ("NotifyService.GetUnreadCount", lambda w: {"parent": w.users["host"].name}),
            ("NotifyService.SubscribeNotifications", lambda w: {"parent": w.users["host"].name}),
            (
                "NotifyService.GetNotificationPreferences",
                lambda w: {"name": f"{w.users['host'].name}/notificationPreferences"},
            ),
            (
                "NotifyService.UpdateNotificationPreferences",
                lambda w: {
                    "preferences": notify_res.NotificationPreferences(
                        name=f"{w.users['host'].name}/notificationPreferences",
                        disabled_kinds=[notify_res.NOTIFICATION_KIND_SPACE_STARTED],
                    ),
                    "update_mask": field_mask_pb2.FieldMask(paths=["disabled_kinds"]),
                },
            ),
            (
                "NotifyService.CreateWebhook",
                lambda w: {
                    "parent": w.users["host"].name,
                    "webhook": notify_res.Webhook(url="https://93.184.215.15/attacker"),
                    "request_id": _rid(),
                },
            ),
            ("NotifyService.ListWebhooks", lambda w: {"parent": w.users["host"].name}),
            (
                "NotifyService.DeleteWebhook",
                lambda w: {"name": f"{w.users['host'].name}/webhooks/{w.webhook}"},
            ),
            (
                "NotifyService.EnableWebhook",
                lambda w: {"name": f"{w.users['host'].name}/webhooks/{w.webhook}"},
            ),
            (
                "NotifyService.ListWebhookDeliveries",
                lambda w: {"parent": f"{w.users['host'].name}/webhooks/{w.webhook}"},
            ),
            (
                "NotifyService.UnregisterDevice",
                lambda w: {"name": f"{w.users['host'].name}/devices/{w.device}"},
            ),
        ]
    ],
    # payments: the host's offering and money, the listener's ticket
    Case(
        "PaymentsService.UpdateTicketOffering",
        lambda w: {
            "ticket_offering": payments_res.TicketOffering(
                name=f"{w.space('scheduled')}/ticketOffering", capacity=1
            ),
            "update_mask": field_mask_pb2.FieldMask(paths=["capacity"]),
        },
        ("cohost", "listener", "outsider"),
        DENIED,
        "NOT_HOST",
    ),
    Case(
        "PaymentsService.GetTicket",
        lambda w: {"name": f"{w.space('scheduled')}/tickets/{w.ticket}"},
        ("cohost", "outsider"),
        NOT_FOUND,
        "TICKET_NOT_FOUND",
    ),
    Case(
        "PaymentsService.RefundTicket",
        lambda w: {"name": f"{w.space('scheduled')}/tickets/{w.ticket}"},
        ("cohost", "outsider"),
        NOT_FOUND,
        "TICKET_NOT_FOUND",
    ),
    Case(
        "PaymentsService.RefundTicket",
        lambda w: {"name": f"{w.space('scheduled')}/tickets/{w.ticket}"},
        ("listener",),
        DENIED,
        "NOT_HOST",
    ),
    *[
        Case(method, fields, OTHERS, DENIED, "NOT_OWNER")
        for method, fields in [
            ("PaymentsService.GetBalance", lambda w: {"name": f"{w.users['host'].name}/balance"}),
            ("PaymentsService.ListLedgerEntries", lambda w: {"parent": w.users["host"].name}),
            (
                "PaymentsService.RequestPayout",
                lambda w: {
                    "parent": w.users["host"].name,
                    "amount": money_pb2.Money(amount_minor=1000, currency_code="USD"),
                    "request_id": _rid(),
                },
            ),
            ("PaymentsService.GetPayout", lambda w: {"name": f"{w.users['host'].name}/payouts/p1"}),
            ("PaymentsService.ListPayouts", lambda w: {"parent": w.users["host"].name}),
        ]
    ],
]

#: App-facing methods any signed-in user may call on their own behalf (the matrix above
#: covers the ones with a "who" rule). A new RPC must be added to one or the other.
OPEN_TO_ANY_USER = {
    "IdentityService": {
        "CreateUser", "Login", "RefreshToken", "GetJwks", "GetUser", "BatchGetUsers",
        "LookupUser", "FollowUser", "UnfollowUser", "ListFollowers", "ListFollowing",
        "BlockUser", "UnblockUser",
    },
    "RoomsService": {
        "CreateSpace", "ListSpaces", "LeaveSpace", "CancelSpeakRequest",
        "AcceptSpeakInvitation", "DeclineSpeakInvitation", "AcceptCoHostInvitation",
        "DeclineCoHostInvitation", "SetOwnMute", "SetCaptionsEnabled", "CreateReminder",
        "ReportParticipant",
    },
    "NotifyService": {"RegisterDevice"},
    "PaymentsService": {
        "CreateTicketOffering", "GetTicketOffering", "PurchaseTicket", "ListTickets", "SendTip",
    },
    "MediaService": {
        "Negotiate", "AddIceCandidate", "RestartIce", "LeaveSession", "ListRecordings",
        "GetRecording", "ReadRecording",
    },
}  # fmt: skip


def test_every_app_facing_rpc_is_in_the_matrix(stack: Stack) -> None:
    covered = {case.method.split(".")[1] for case in CASES}
    missing = []
    for method in app_facing_methods(stack):
        service = method.containing_service.name
        if method.name not in covered and method.name not in OPEN_TO_ANY_USER.get(service, ()):
            missing.append(method.full_name)
    assert not missing, f"add these RPCs to the authorization matrix: {missing}"


@pytest.mark.parametrize("service", [s for s in SERVICES if s != "media"])
async def test_every_role_and_owner_rule_refuses_with_the_documented_code(
    world: World, service: str
) -> None:
    if service == "notify":
        await make_notify_resources(world)
    before = await snapshot(world, notify=service == "notify")
    failures: list[str] = []
    calls = 0
    started = time.monotonic()
    prefix = service.capitalize() + "Service."
    for case in [c for c in CASES if c.method.startswith(prefix)]:
        method = Api.method(case.method)
        for role in case.refused:
            fields = case.fields(world)
            if "request_id" in fields and not fields["request_id"]:
                fields["request_id"] = _rid()
            request = Api.request(method, **fields)
            result: CallResult = await world.api.call(
                method, request, token=world.users[role].token
            )
            calls += 1
            if (result.code, result.reason) != (case.code, case.reason):
                failures.append(
                    f"{case.method} as {role}: got {result.code.name} {result.reason!r}"
                    f" ({result.details}), want {case.code.name} {case.reason!r}"
                )
    elapsed = time.monotonic() - started
    print(
        f"\nauthz roles {service}: {calls} forbidden calls, {len(failures)} wrong, {elapsed:.1f} s"
    )
    assert not failures, "\n".join(failures)
    after = await snapshot(world, notify=service == "notify")
    assert after == before


async def test_a_private_space_is_in_no_list_of_an_outsider(world: World) -> None:
    outsider = world.users["outsider"]
    private = world.space("private")
    spaces = await world.api.ok("RoomsService.ListSpaces", token=outsider.token)
    hosted = await world.api.ok(
        "RoomsService.ListSpaces", token=outsider.token, host=world.users["host2"].name
    )
    feed = await world.api.ok(
        "RoomsService.GetDiscoveryFeed", token=outsider.token, name="users/me/discoveryFeed"
    )
    assert private not in str(spaces) and private not in str(hosted)
    assert private not in str(feed)
    # The Space is there for its host: the lists would show it if visibility allowed.
    own = await world.api.ok("RoomsService.ListSpaces", token=world.users["host2"].token)
    assert private in str(own)


# --- 3. snapshot ----------------------------------------------------------------------------


async def make_notify_resources(world: World) -> None:
    """The host's webhook and device, for the notify part of the matrix."""
    host = world.users["host"]
    webhook = await world.api.ok(
        "NotifyService.CreateWebhook",
        token=host.token,
        parent=host.name,
        webhook=notify_res.Webhook(url="https://93.184.215.14/spaces-hook"),
        request_id=_rid(),
    )
    world.webhook = webhook.webhook.name.split("/")[-1]
    # RegisterDevice has a field named "token", so its request is built by hand.
    registered = await world.api.call(
        "NotifyService.RegisterDevice",
        Api.request(
            Api.method("NotifyService.RegisterDevice"),
            parent=host.name,
            platform=notify_res.PLATFORM_FCM,
            token="fcm-device-token-of-host",
        ),
        token=host.token,
    )
    assert registered.ok, registered
    world.device = registered.response.device.name.split("/")[-1]


async def snapshot(world: World, *, notify: bool = False) -> dict[str, Any]:
    """Everything a forbidden call could have changed, read with the owners' tokens."""
    api, u = world.api, world.users
    reads: dict[str, tuple[str, str, dict[str, Any]]] = {
        "live": ("RoomsService.GetSpace", "host", {"name": world.space("live")}),
        "scheduled": ("RoomsService.GetSpace", "host", {"name": world.space("scheduled")}),
        "private": ("RoomsService.GetSpace", "host2", {"name": world.space("private")}),
        "live participants": (
            "RoomsService.ListParticipants",
            "host",
            {"parent": world.space("live"), "page_size": 50},
        ),
        "raised hands": (
            "RoomsService.ListParticipants",
            "host",
            {"parent": world.space("live"), "hand_raised_only": True},
        ),
        "private participants": (
            "RoomsService.ListParticipants",
            "host2",
            {"parent": world.space("private")},
        ),
        "offering": (
            "PaymentsService.GetTicketOffering",
            "host",
            {"name": f"{world.space('scheduled')}/ticketOffering"},
        ),
        "tickets": ("PaymentsService.ListTickets", "host", {"parent": world.space("scheduled")}),
    }
    if notify:
        reads["webhooks"] = ("NotifyService.ListWebhooks", "host", {"parent": u["host"].name})
        reads["preferences"] = (
            "NotifyService.GetNotificationPreferences",
            "host",
            {"name": f"{u['host'].name}/notificationPreferences"},
        )
    for name, user in u.items():
        reads[f"{name} profile"] = ("IdentityService.GetUser", name, {"name": user.name})
        reads[f"{name} blocks"] = (
            "IdentityService.ListBlockedUsers",
            name,
            {"parent": user.name},
        )
        reads[f"{name} following"] = (
            "IdentityService.ListFollowing",
            name,
            {"parent": user.name},
        )
        reads[f"{name} balance"] = (
            "PaymentsService.GetBalance",
            name,
            {"name": f"{user.name}/balance"},
        )
        reads[f"{name} payouts"] = ("PaymentsService.ListPayouts", name, {"parent": user.name})
    state: dict[str, Any] = {}
    for key, (method, who, fields) in reads.items():
        result = await api.call(method, token=u[who].token, **fields)
        assert result.ok, f"snapshot read {key}: {result.code.name} {result.details}"
        state[key] = MessageToDict(result.response)
    # The refresh tokens still work: nobody logged anyone out. (Refreshing rotates them,
    # so the check is that the host's session family is alive, via a fresh log-in.)
    login = await api.call(
        "IdentityService.Login", handle=u["host"].handle, password=u["host"].password
    )
    state["host can log in"] = login.ok
    return state


# --- through the gateway --------------------------------------------------------------------


async def test_gateway_maps_refusals_to_http(world: World) -> None:
    gateway = world.stack.services["gateway"]
    base = f"http://127.0.0.1:{gateway.http_port}"
    live = world.space("live")
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        none = await client.post(f"/v1/{live}:end", json={})
        forged = await client.post(
            f"/v1/{live}:end",
            json={},
            headers={"Authorization": f"Bearer {unsigned_token(world.users['host'].id)}"},
        )
        listener = await client.post(
            f"/v1/{live}:end",
            json={},
            headers={"Authorization": f"Bearer {world.users['listener'].token}"},
        )
        state = await client.get(
            f"/v1/{live}", headers={"Authorization": f"Bearer {world.users['host'].token}"}
        )
    assert none.status_code == 401, none.text
    assert forged.status_code == 401, forged.text
    assert listener.status_code == 403, listener.text
    assert listener.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    reasons = [d.get("reason") for d in listener.json()["details"]]
    assert "NOT_HOST" in reasons
    assert state.json()["space"]["state"] == "SPACE_STATE_LIVE", state.text
    print(
        f"\nauthz gateway: no token {none.status_code}, alg=none {forged.status_code},"
        f" listener ends Space {listener.status_code}"
    )
