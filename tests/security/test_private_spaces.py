"""Private Spaces against the real processes, through the gateway's HTTP/JSON API.

An invited-only Space and a followers-only Space, both live, and an outsider (who follows
both hosts, so a leak through the discovery feed or a notification would show) and a user
the host blocked. The contract (rooms_service.proto): a Space the caller may not see is
reported as NOT_FOUND (SPACE_NOT_FOUND) "exactly as if it did not exist". So, for them:

1. **Lists.** The private Spaces are in no list: ListSpaces (default states, every state,
   by host, page by page with page_size 1), the discovery feed, their notifications. The
   same lists do show them to the invited user and the follower (the control).
2. **By id.** Every app-facing route that names a Space (rooms, payments, media: GetSpace,
   JoinSpace, ListParticipants, reactions, reports, tickets, tips, recordings, ...) answers
   them exactly as it answers for a Space id that does not exist (status, code, reason,
   message); the core ones (GetSpace, JoinSpace, WatchSpace over a WebSocket, ...) are
   NOT_FOUND (SPACE_NOT_FOUND). Nothing changes: the host's view of the Space and its
   participants is the same before and after.
3. **Join links.** A valid link lets its holder see and join; an expired one (signed with
   rooms' real key, in the past) is FAILED_PRECONDITION (JOIN_LINK_EXPIRED); a link for
   another Space, a tampered or truncated one and garbage are INVALID_ARGUMENT
   (JOIN_LINK_INVALID); a blocked user with a valid link still gets SPACE_NOT_FOUND; a
   user removed with block_from_space gets REMOVED_FROM_SPACE; once the Space ended the
   link joins nobody. Every refused join leaves the participant list as it was.
4. **Visibility narrowed.** A followers-only Space made invited-only hides itself from the
   follower who had not joined (the one who had stays, as documented), while a join link
   keeps working (links work "whatever its visibility"; the API has no revocation).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from spaces.common.v1 import options_pb2
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from services.rooms.tokens import JoinLinks
from tools.devstack import Stack

_NOT_FOUND = (404, "SPACE_NOT_FOUND")
_LINK_INVALID = (400, "JOIN_LINK_INVALID")
_LINK_EXPIRED = (400, "JOIN_LINK_EXPIRED")
_PRICE = {"amountMinor": "500", "currencyCode": "USD"}
_ALL_STATES = (
    "SPACE_STATE_SCHEDULED",
    "SPACE_STATE_LIVE",
    "SPACE_STATE_ENDED",
    "SPACE_STATE_CANCELED",
)


@dataclass(frozen=True)
class Reply:
    """What the gateway answered: the HTTP status, the ErrorInfo reason, the body."""

    status: int
    reason: str
    body: dict[str, Any]

    @property
    def message(self) -> str:
        return str(self.body.get("message", ""))


@dataclass
class Person:
    """A signed-up user and their access token."""

    user_id: str
    token: str

    @property
    def name(self) -> str:
        return f"users/{self.user_id}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class World:
    """The gateway, the people and the Spaces of the scenario."""

    client: httpx.AsyncClient
    stack: Stack
    ws_base: str
    people: dict[str, Person]
    invited_only: str  # spaces/{id}, live, hosted by "host"
    followers_only: str  # spaces/{id}, live, hosted by "host2"
    public: str  # spaces/{id}, live, hosted by "host3": the control every list shows
    ticketed: str = ""  # spaces/{id}, scheduled, ticketed, invited-only, hosted by "host"
    checks: int = 0
    refused_joins: int = 0

    def __getitem__(self, who: str) -> Person:
        return self.people[who]

    async def send(
        self, verb: str, path: str, who: str | None, body: Any = None, **params: Any
    ) -> Reply:
        """One call as ``who`` (None: no token); ``params`` go in the query string."""
        headers = self.people[who].auth if who else {}
        for _ in range(50):
            reply = await self.client.request(
                verb,
                path,
                json=body if verb not in ("GET", "DELETE") else None,
                params={k: v for k, v in params.items() if v is not None},
                headers=headers,
            )
            if reply.status_code != 429:
                break
            # The gateway's per-user rate limit (20/s): wait as told, as an app does; the
            # sweep is about answers, not about the limit.
            await asyncio.sleep(_retry_delay(reply))
        try:
            data: dict[str, Any] = reply.json()
        except ValueError:
            data = {"raw": reply.text}
        reasons = [
            d.get("reason", "")
            for d in data.get("details", [])
            if isinstance(d, dict) and str(d.get("@type", "")).endswith("ErrorInfo")
        ]
        return Reply(reply.status_code, reasons[0] if reasons else "", data)

    async def ok(self, verb: str, path: str, who: str, body: Any = None, **params: Any) -> Any:
        """Call and return the JSON answer; anything but 200 fails the test."""
        reply = await self.send(verb, path, who, body, **params)
        assert reply.status == 200, f"{verb} {path} as {who}: {reply.status} {reply.body}"
        return reply.body

    def expect(self, what: str, reply: Reply, want: tuple[int, str]) -> None:
        self.checks += 1
        assert (reply.status, reply.reason) == want, f"{what}: got {reply.status} {reply.body}"


def _retry_delay(reply: httpx.Response) -> float:
    for detail in reply.json().get("details", []):
        if str(detail.get("@type", "")).endswith("RetryInfo"):
            return float(str(detail.get("retryDelay", "0.1s")).rstrip("s")) + 0.01
    return 0.1


def _rid() -> str:
    return str(uuid.uuid4())


async def _sign_up(client: httpx.AsyncClient, prefix: str) -> Person:
    reply = await client.post(
        "/v1/users",
        json={
            "user": {"handle": f"{prefix[:6]}_{uuid.uuid4().hex[:8]}", "displayName": prefix},
            "password": "correct horse battery",
            "requestId": _rid(),
        },
    )
    assert reply.status_code == 200, reply.text
    data = reply.json()
    return Person(data["user"]["name"].split("/")[1], data["tokens"]["accessToken"])


@pytest.fixture(scope="module")
async def world(stack: Stack) -> AsyncIterator[World]:
    """The people, their follows and blocks, and the Spaces, made through the gateway."""
    port = stack.services["gateway"].http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
        names = ["host", "host2", "host3", "invited", "holder", "outsider", "blocked"]
        names += ["follower", "late_follower", "kicked"]
        people = {name: await _sign_up(client, name) for name in names}
        world = World(client, stack, f"ws://127.0.0.1:{port}", people, "", "", "")
        # The outsider and the blocked user follow every host: whatever reaches followers
        # (feed, notifications) would reach them too.
        for fan in ("outsider", "blocked", "follower", "late_follower"):
            for host in ("host", "host2", "host3"):
                await world.ok("POST", f"/v1/{people[host].name}:follow", fan, {})
        for followed in ("follower", "late_follower", "blocked"):
            await world.ok("POST", f"/v1/{people[followed].name}:follow", "host2", {})
        await world.ok("POST", f"/v1/{people['blocked'].name}:block", "host", {})
        await world.ok("POST", f"/v1/{people['blocked'].name}:block", "host2", {})

        async def create(host: str, visibility: str, title: str) -> str:
            body = {"space": {"title": title, "visibility": visibility}, "requestId": _rid()}
            return str((await world.ok("POST", "/v1/spaces", host, body))["space"]["name"])

        world.invited_only = await create("host", "SPACE_VISIBILITY_INVITED_ONLY", "invited only")
        world.followers_only = await create(
            "host2", "SPACE_VISIBILITY_FOLLOWED_BY_HOST", "followers only"
        )
        world.public = await create("host3", "SPACE_VISIBILITY_EVERYONE", "public")
        world.ticketed = await _ticketed_space(world)
        # Invited after the block: skipped silently (the contract), so it must not let the
        # blocked user in.
        await world.ok(
            "POST",
            f"/v1/{world.invited_only}:inviteUsers",
            "host",
            {"users": [people["invited"].name, people["blocked"].name]},
        )
        yield world


async def _ticketed_space(world: World) -> str:
    """A scheduled, ticketed, invited-only Space with tickets on sale; the invited user may
    read the offering (the control), nobody else may learn of it."""
    start = (datetime.now(UTC) + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    body = {
        "space": {
            "title": "ticketed invited only",
            "visibility": "SPACE_VISIBILITY_INVITED_ONLY",
            "ticketed": True,
            "scheduledStartTime": start,
        },
        "requestId": _rid(),
    }
    space = str((await world.ok("POST", "/v1/spaces", "host", body))["space"]["name"])
    await world.ok("POST", f"/v1/{space}:inviteUsers", "host", {"users": [world["invited"].name]})
    deadline = time.monotonic() + 30
    while True:  # payments learns of the Space from rooms' events, a moment later
        # A new request_id each time: payments remembers a refusal under its key.
        offer = {"ticketOffering": {"price": _PRICE, "capacity": 10}, "requestId": _rid()}
        reply = await world.send("POST", f"/v1/{space}/ticketOffering", "host", offer)
        if reply.status == 200:
            break
        assert time.monotonic() < deadline, f"no offering: {reply.body}"
        await asyncio.sleep(0.2)
    await world.ok("GET", f"/v1/{space}/ticketOffering", "invited")
    return space


# --- helpers ----------------------------------------------------------------------------


async def participants(world: World, space: str, host: str) -> list[str]:
    """The participant names of a Space, read by its host, every page."""
    names: list[str] = []
    token = ""
    while True:
        page = await world.ok(
            "GET", f"/v1/{space}/participants", host, pageSize=100, pageToken=token or None
        )
        names += [p["name"] for p in page.get("participants", [])]
        token = page.get("nextPageToken", "")
        if not token:
            return sorted(names)


async def host_view(world: World, space: str, host: str) -> dict[str, Any]:
    """What a refused call must not change: the Space, its participants, the host's money
    (a tip or a ticket sale would show there)."""
    return {
        "balance": await world.ok("GET", f"/v1/{world[host].name}/balance", host),
        "space": (await world.ok("GET", f"/v1/{space}", host))["space"],
        "participants": await participants(world, space, host),
    }


async def every_list(world: World, who: str) -> dict[str, Any]:
    """Every list or discovery answer that can name a Space, as ``who`` reads it."""
    found: dict[str, Any] = {}
    found["ListSpaces"] = await world.ok("GET", "/v1/spaces", who)
    found["ListSpaces every state"] = await world.ok(
        "GET", "/v1/spaces", who, states=list(_ALL_STATES), pageSize=50
    )
    for host in ("host", "host2"):
        found[f"ListSpaces by {host}"] = await world.ok(
            "GET", "/v1/spaces", who, host=world[host].name, states=list(_ALL_STATES)
        )
    # Page by page: a hidden Space must not show through page boundaries either.
    pages: list[Any] = []
    token = ""
    for _ in range(200):
        page = await world.ok(
            "GET", "/v1/spaces", who, states=list(_ALL_STATES), pageSize=1, pageToken=token or None
        )
        pages.append(page)
        token = page.get("nextPageToken", "")
        if not token:
            break
    found["ListSpaces pages of 1"] = pages
    found["discovery feed"] = await world.ok("GET", "/v1/users/me/discoveryFeed", who)
    found["notifications"] = await world.ok(
        "GET", f"/v1/{world[who].name}/notifications", who, pageSize=100
    )
    return found


def _ids_in(lists: dict[str, Any]) -> str:
    return json.dumps(lists)


def link_key(stack: Stack) -> bytes:
    """Rooms' join-link key as rooms derives it when ROOMS_JOIN_LINK_SECRET is unset (as in
    this stack): from the shared internal secret (services/rooms/main.py). A fresh link
    signed with it is checked to work below, so a wrong derivation cannot pass silently."""
    base = stack.shared_secret("internal-secret").encode()
    return hashlib.sha256(b"rooms-join-links:" + base).digest()


async def create_link(world: World, space: str, host: str) -> str:
    return str(
        (await world.ok("POST", f"/v1/{space}:createJoinLink", host, {}))["joinLink"]["token"]
    )


async def join(world: World, space: str, who: str, link: str = "") -> Reply:
    body: dict[str, Any] = {"requestId": _rid()}
    if link:
        body["joinLinkToken"] = link
    return await world.send("POST", f"/v1/{space}:join", who, body)


async def watch(world: World, space: str, who: str) -> tuple[int, dict[str, Any]]:
    """WatchSpace over the WebSocket, as apps do: (close code, the first frame). (WatchSpace
    takes no join link: a link holder watches once they joined.)"""
    url = f"{world.ws_base}/v1/{space}:watch"
    for _ in range(50):
        async with connect(url, additional_headers=world[who].auth) as ws:
            try:
                frame = json.loads(await ws.recv())
            except ConnectionClosed:
                frame = {}
            if "error" not in frame:
                await ws.close()
                return 1000, frame
            try:
                await ws.recv()
            except ConnectionClosed:
                pass
            code = ws.close_code or 0
        if code != 4429:
            return code, frame
        await asyncio.sleep(0.2)  # rate limited (see World.send): wait and watch again
    raise AssertionError("still rate limited after 50 tries")


async def refused_join(
    world: World, space: str, host: str, who: str, link: str, want: tuple[int, str], what: str
) -> None:
    """A join that must be refused with ``want``, and must leave the participants as they
    were."""
    before = await participants(world, space, host)
    world.expect(what, await join(world, space, who, link), want)
    assert await participants(world, space, host) == before, f"{what}: participants changed"
    world.refused_joins += 1


# --- 1. lists ---------------------------------------------------------------------------


async def test_private_spaces_are_in_no_list_of_an_outsider(world: World) -> None:
    private = (world.invited_only, world.followers_only, world.ticketed)
    for who in ("outsider", "blocked"):
        lists = await every_list(world, who)
        text = _ids_in(lists)
        for space in private:
            for name, answer in lists.items():
                world.checks += 1
                assert space.split("/")[1] not in json.dumps(answer), f"{space} in {who}'s {name}"
        # The control: the same lists do show a public Space to them.
        world.checks += 1
        assert world.public in text, f"the public Space is missing from {who}'s lists"
    # And the private Spaces are listed to those allowed to see them.
    invited = _ids_in(await every_list(world, "invited"))
    follower = _ids_in(await every_list(world, "follower"))
    world.checks += 2
    assert world.invited_only in invited and world.ticketed in invited
    assert world.followers_only in follower
    print(f"\nprivate spaces, lists: {world.checks} checks")


# --- 2. by id, exactly as if it did not exist -------------------------------------------


def _http_rule(method: MethodDescriptor) -> Any:
    # Typed Any: the generated stub types the extension as a plain FieldDescriptor.
    http: Any = annotations_pb2.http
    options = method.GetOptions()
    if not options.HasExtension(http):
        return None
    return options.Extensions[http]


def space_routes() -> list[tuple[str, str, str, str]]:
    """(method, verb, path template, body rule) of every app-facing route naming a Space."""
    routes: list[tuple[str, str, str, str]] = []
    pool = descriptor_pool.Default()
    for service in ("rooms", "payments", "media"):
        file = pool.FindFileByName(f"spaces/{service}/v1/{service}_service.proto")
        for descriptor in file.services_by_name.values():
            for method in descriptor.methods:
                rule = _http_rule(method)
                access = method.GetOptions().Extensions[options_pb2.access]
                if rule is None or access == options_pb2.ACCESS_INTERNAL:
                    continue
                verb = rule.WhichOneof("pattern")
                path = str(getattr(rule, verb))
                if "=spaces/*" in path:
                    routes.append((method.name, verb.upper(), path, rule.body))
    return routes


def _fill(template: str, space_id: str, user_id: str) -> str:
    """The path of a route for a Space: its first ``*`` is the Space, any other a user."""
    out: list[str] = []
    for chunk in template.split("{"):
        if "}" not in chunk:
            out.append(chunk)
            continue
        binding, rest = chunk.split("}", 1)
        pattern = binding.split("=", 1)[1]
        parts = pattern.split("/")
        filled = [
            space_id if i == 1 else (user_id if part == "*" else part)
            for i, part in enumerate(parts)
        ]
        out.append("/".join(filled) + rest)
    return "".join(out)


def _body(method: str, world: World, host: str) -> dict[str, Any]:
    """A request that would pass validation, so the answer is about the Space itself (a tip
    goes to the Space's host, who is on its stage)."""
    bodies: dict[str, dict[str, Any]] = {
        "JoinSpace": {"requestId": _rid()},
        "SendReaction": {"emoji": "EMOJI_HUNDRED"},
        "ReportSpace": {"reason": "REPORT_REASON_SPAM"},
        "ReportParticipant": {"reason": "REPORT_REASON_SPAM"},
        "SetOwnMute": {"muted": True},
        "SetSpeakPermission": {"speakPermission": "SPEAK_PERMISSION_EVERYONE"},
        "SetCaptionsEnabled": {"enabled": True},
        "PinMessage": {"text": "pinned"},
        "InviteUsers": {"users": [world["outsider"].name]},
        "UpdateSpace": {"title": "taken over"},
        "CreateTicketOffering": {
            "ticketOffering": {"price": _PRICE, "capacity": 5},
            "requestId": _rid(),
        },
        "UpdateTicketOffering": {"price": _PRICE},
        "PurchaseTicket": {"requestId": _rid(), "paymentMethod": "tok_visa", "price": _PRICE},
        "SendTip": {
            "requestId": _rid(),
            "recipient": host,
            "amount": _PRICE,
            "paymentMethod": "tok_visa",
        },
    }
    return bodies.get(method, {})


_QUERY: dict[str, dict[str, str]] = {
    "UpdateSpace": {"updateMask": "title"},
    "UpdateTicketOffering": {"updateMask": "price"},
}


def _normalized(reply: Reply, space_id: str) -> tuple[int, str, str]:
    return reply.status, reply.reason, reply.message.replace(space_id, "{space}")


async def test_by_id_a_private_space_is_answered_as_if_it_did_not_exist(world: World) -> None:
    started = time.monotonic()
    checks_before = world.checks
    routes = space_routes()
    assert len(routes) > 30, "too few routes found: has the descriptor walk broken?"
    spaces = {world.invited_only: "host", world.followers_only: "host2", world.ticketed: "host"}
    before = {space: await host_view(world, space, host) for space, host in spaces.items()}
    differences: list[str] = []
    for space, host in spaces.items():
        space_id = space.split("/")[1]
        missing_id = f"nx{uuid.uuid4().hex[:24]}"
        for who in ("outsider", "blocked"):
            for method, verb, template, _ in routes:
                user = world[host].user_id
                answers = []
                for target in (space_id, missing_id):
                    path = _fill(template, target, user)
                    reply = await world.send(
                        verb,
                        path,
                        who,
                        _body(method, world, world[host].name),
                        **_QUERY.get(method, {}),
                    )
                    answers.append(_normalized(reply, target))
                world.checks += 1
                if answers[0] != answers[1]:
                    differences.append(
                        f"{method} as {who} on {space}: {answers[0]} but for a missing Space"
                        f" {answers[1]}"
                    )
                if method in ("GetSpace", "JoinSpace", "ListParticipants", "GetParticipant"):
                    world.checks += 1
                    assert answers[0][:2] == _NOT_FOUND, f"{method} as {who}: {answers[0]}"
            close, frame = await watch(world, space, who)
            world.checks += 1
            reasons = [d.get("reason") for d in frame.get("error", {}).get("details", [])]
            assert (close, reasons) == (4404, ["SPACE_NOT_FOUND"]), (close, frame)
    after = {space: await host_view(world, space, host) for space, host in spaces.items()}
    world.checks += 1
    changed = [space for space in spaces if after[space] != before[space]]
    print(
        f"\nprivate spaces, by id: {len(routes)} routes x {len(spaces)} Spaces x 2 callers,"
        f" {world.checks - checks_before} checks, {len(differences)} differences,"
        f" {len(changed)} Spaces changed, {time.monotonic() - started:.1f} s"
    )
    assert not differences and not changed, (
        "existence leaks:\n"
        + "\n".join(differences)
        + f"\nchanged by refused calls (Space, participants or the host's balance): {changed}"
    )


# --- 3. join links ----------------------------------------------------------------------


def _tamper_payload(token: str, space_id: str) -> str:
    """The link with its payload naming ``space_id`` instead, its MAC kept."""
    body, _, mac = token.partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["s"] = space_id
    forged = base64.urlsafe_b64encode(
        json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    )
    return f"{forged.rstrip(b'=').decode()}.{mac}"


async def test_join_links_valid_stale_foreign_and_tampered(world: World) -> None:
    checks_before = world.checks
    space, space_id = world.invited_only, world.invited_only.split("/")[1]
    other = world.followers_only
    link = await create_link(world, space, "host")
    other_link = await create_link(world, other, "host2")
    signer = JoinLinks(link_key(world.stack), "https://x")
    now = datetime.now(UTC)
    expired, _, _ = signer.issue(space_id, timedelta(minutes=1), now - timedelta(hours=1))
    minted, _, _ = signer.issue(space_id, timedelta(minutes=5), now)
    body, _, mac = link.partition(".")
    flipped_mac = f"{body}.{('A' if mac[0] != 'A' else 'B')}{mac[1:]}"

    # Refused: the documented code and reason each, the participants unchanged.
    cases: list[tuple[str, str, tuple[int, str]]] = [
        ("an expired link", expired, _LINK_EXPIRED),
        ("a link for another Space", other_link, _LINK_INVALID),
        ("a link with a flipped MAC", flipped_mac, _LINK_INVALID),
        (
            "a link naming this Space with another's MAC",
            _tamper_payload(other_link, space_id),
            _LINK_INVALID,
        ),
        ("a truncated link", link[:-6], _LINK_INVALID),
        ("a link without its MAC", body, _LINK_INVALID),
        ("garbage", "not-a-link", _LINK_INVALID),
    ]
    for what, token, want in cases:
        await refused_join(world, space, "host", "outsider", token, want, f"join with {what}")
        world.expect(
            f"get with {what}",
            await world.send("GET", f"/v1/{space}", "outsider", joinLinkToken=token),
            want,
        )
    # The other Space's link works for the other Space only (the control for the above).
    world.expect(
        "the other link, for its own Space",
        await world.send("GET", f"/v1/{other}", "outsider", joinLinkToken=other_link),
        (200, ""),
    )
    # A blocked user holding a valid link is still told the Space does not exist.
    await refused_join(
        world, space, "host", "blocked", link, _NOT_FOUND, "blocked user with a link"
    )
    world.expect(
        "blocked user gets with a link",
        await world.send("GET", f"/v1/{space}", "blocked", joinLinkToken=link),
        _NOT_FOUND,
    )

    # Valid: the host's link and one signed with rooms' key now (the check that the key
    # the expired link was signed with is the real one).
    world.expect(
        "holder gets with the link",
        await world.send("GET", f"/v1/{space}", "holder", joinLinkToken=link),
        (200, ""),
    )
    before = await participants(world, space, "host")
    world.expect("holder joins with the link", await join(world, space, "holder", link), (200, ""))
    world.expect(
        "kicked joins with a freshly minted link",
        await join(world, space, "kicked", minted),
        (200, ""),
    )
    after = await participants(world, space, "host")
    world.checks += 1
    assert len(after) == len(before) + 2, (before, after)
    # Removed with block_from_space: the link does not bring them back.
    await world.ok(
        "POST",
        f"/v1/{space}/participants/{world['kicked'].user_id}:remove",
        "host",
        {"blockFromSpace": True},
    )
    await refused_join(
        world,
        space,
        "host",
        "kicked",
        link,
        (403, "REMOVED_FROM_SPACE"),
        "removed user with a link",
    )
    print(f"\nprivate spaces, join links: {world.checks - checks_before} checks")


async def test_narrowed_visibility_hides_from_new_joins_but_links_still_work(world: World) -> None:
    checks_before = world.checks
    space = world.followers_only
    link = await create_link(world, space, "host2")
    # The follower joins while the Space is followers-only; the late one does not.
    world.expect("follower joins", await join(world, space, "follower"), (200, ""))
    etag = (await world.ok("GET", f"/v1/{space}", "host2"))["space"].get("etag")
    update: dict[str, Any] = {"visibility": "SPACE_VISIBILITY_INVITED_ONLY"}
    if etag:
        update["etag"] = etag
    await world.ok("PATCH", f"/v1/{space}", "host2", update, updateMask="visibility")
    await refused_join(
        world, space, "host2", "late_follower", "", _NOT_FOUND, "follower after narrowing"
    )
    world.expect(
        "follower after narrowing gets",
        await world.send("GET", f"/v1/{space}", "late_follower"),
        _NOT_FOUND,
    )
    lists = await every_list(world, "late_follower")
    # The notification that the Space started stays: it was true and allowed when sent.
    del lists["notifications"]
    world.checks += 1
    assert space.split("/")[1] not in _ids_in(lists), "the narrowed Space is still listed"
    # Documented: narrowing affects new joins only; the follower who joined stays and sees it.
    world.expect(
        "joined follower still sees", await world.send("GET", f"/v1/{space}", "follower"), (200, "")
    )
    # Documented: a join link works whatever the visibility; it was made before the change.
    world.expect(
        "link made before narrowing", await join(world, space, "late_follower", link), (200, "")
    )
    print(f"\nprivate spaces, narrowed visibility: {world.checks - checks_before} checks")


async def test_a_link_to_an_ended_space_joins_nobody(world: World) -> None:
    checks_before = world.checks
    space = world.invited_only
    link = await create_link(world, space, "host")
    await world.ok("POST", f"/v1/{space}:end", "host", {})
    before = await participants(world, space, "host")
    # "The link stops working when it expires or the Space ends" (CreateJoinLink): past
    # the end it is a stale link, for seeing the Space as much as for joining it.
    world.expect("join after the end", await join(world, space, "outsider", link), _LINK_EXPIRED)
    world.expect(
        "get after the end",
        await world.send("GET", f"/v1/{space}", "outsider", joinLinkToken=link),
        _LINK_EXPIRED,
    )
    world.checks += 1
    assert await participants(world, space, "host") == before
    world.refused_joins += 1
    # Ended Spaces are still hidden from everyone's lists but the host's and invitees'.
    for who in ("outsider", "blocked"):
        world.checks += 1
        assert space.split("/")[1] not in _ids_in(await every_list(world, who))
    world.expect(
        "new links for an ended Space",
        await world.send("POST", f"/v1/{space}:createJoinLink", "host", {}),
        (400, "SPACE_ENDED"),
    )
    print(
        f"\nprivate spaces, ended: {world.checks - checks_before} checks;"
        f" in all {world.checks} checks, {world.refused_joins} refused joins with the"
        " participants unchanged"
    )
