"""The running suite as Prometheus sees it: every service's ``/metrics`` exports what the
dashboards read, and a real Prometheus (Debian's ``prometheus``) scraping the processes answers
every query of every dashboard panel *with data*.

Prometheus gets the labels the Prometheus Operator adds in a cluster (``namespace``,
``service`` and ``pod``), so the dashboards' queries run here exactly as they do there.

The data comes from real traffic through the gateway over HTTP/JSON, driven once for the
module (:func:`traffic`) while Prometheus already scrapes every second: sign-ups and follows,
a webhook whose receiver (a local HTTP server) answers 500, a scheduled ticketed Space with
purchases and refunds, declines, processor timeouts and a reminder that falls due at once, a
live Space with real aiortc audio (a speaker's tone heard by two listeners, one of whom sends
audio it may not publish), WebSocket watchers, reactions, a raised hand, a tip, the Space's
end (its revenue settled), payouts, and bad requests.

Two checks: every query answers data now (NaN is no data), and, over the traffic, every
query moved off 0 except the few in :data:`ZERO_ALLOWED`. A labelled series is born with its
first increment, which ``rate()`` never shows; so the traffic waits for Prometheus to scrape
such a series (:func:`_scraped`) and does the same thing again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import json
import math
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioice.ice
import httpx
import pytest
import redis
import yaml
from aiortc import RTCSessionDescription
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.chart.support import (
    PENDING_METRICS,
    concrete_query,
    dashboard_queries,
    metric_names,
    series_names,
)
from tests.integration.media.peers import App, SlotRecorder, Tone, eventually, heard
from tools.devstack import SERVICES, Stack, free_port

PROMETHEUS = shutil.which("prometheus")
NAMESPACE = "spaces-local"
SCRAPE_INTERVAL_S = 1
PASSWORD = "correct horse battery"
USD = "USD"
TICKET_PRICE = {"amountMinor": "500", "currencyCode": USD}
TIP = {"amountMinor": "5000", "currencyCode": USD}  # 4500 net of the platform fee
PAYOUT = {"amountMinor": "1000", "currencyCode": USD}  # the smallest payout allowed

# Sandbox test cards and tokens (services/payments/processor.py).
CARD_OK = "4242424242424242"
CARD_DECLINED = "4000000000000002"  # card_declined
TOKEN_TIMEOUT = "tok_timeout"  # no answer in time, nothing charged: UNAVAILABLE

#: Metrics whose dashboard queries may answer nothing, with why. Empty: every query of
#: every panel must answer data. (A gauge at 0 *is* data.) A metric of PENDING_METRICS is
#: allowed no data too, but only while the running suite does not export it.
NO_DATA_ALLOWED: dict[str, str] = {}

#: Metrics whose dashboard queries may stay at 0 through the whole traffic (they answer,
#: with zeros), with why. Every other query must show a non-zero value at some point of it:
#: the traffic reaches every panel.
ZERO_ALLOWED: dict[str, str] = {
    "spaces_media_relay_streams": "relays are not built yet: no node pulls or serves one",
    "spaces_media_receiver_loss_ratio_bucket": "loopback loses no packets: p50/p99 loss is 0",
    "spaces_notify_fanout_lag_seconds": "fan-outs to five followers finish between scrapes",
    "spaces_notify_reminders_due": "the reminder loop sends a due reminder within 0.2 s",
    "spaces_payments_ledger_imbalance": "the books balance (asserted to be 0 below)",
    "spaces_rooms_live_publish_failures_total": "Redis is up: every publish succeeds",
    "spaces_rooms_live_repaired_events_total": "Redis is up: no event needs repairing",
}


# -- the suite and a webhook receiver -------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    extra_env = {
        # The webhook receiver is a local plain-HTTP server.
        "NOTIFY_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",
        "NOTIFY_WEBHOOK_ALLOW_HTTP": "true",
        # Gauges and workers on test time: the rooms gauges, payouts, the ledger check.
        "ROOMS_GAUGE_INTERVAL_S": "1",
        "PAYMENTS_WORKER_INTERVAL_S": "0.2",
        "PAYMENTS_LEDGER_CHECK_INTERVAL_S": "2",
        # Nothing is live at teardown: no need to wait for sessions to drain.
        "MEDIA_DRAIN_GRACE_S": "1",
    }
    t0 = time.monotonic()
    with Stack(tmp_path_factory.mktemp("scrape-stack"), auto_ports=True, extra_env=extra_env) as s:
        print(f"stack up in {time.monotonic() - t0:.1f} s")
        yield s


class FailingReceiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that is down: every delivery gets a 500."""

    hits: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        FailingReceiver.hits.append(self.path)
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return


@pytest.fixture(scope="module")
def webhook_receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailingReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/spaces-hook"
    finally:
        server.shutdown()
        server.server_close()


# -- a real Prometheus ------------------------------------------------------------------------


def _prometheus_config(stack: Stack) -> dict[str, Any]:
    targets = [
        {
            "targets": [f"127.0.0.1:{running.metrics_port}"],
            "labels": {"namespace": NAMESPACE, "service": f"spaces-{name}", "pod": f"{name}-0"},
        }
        for name, running in stack.services.items()
    ]
    return {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "spaces", "static_configs": targets}],
    }


def _query(url: str, promql: str) -> dict[str, Any]:
    address = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(address, timeout=10) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    assert answer["status"] == "success", f"{promql}: {answer}"
    return answer


def _result(url: str, promql: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = _query(url, promql)["data"]["result"]
    return result


def _wait_for(check: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _targets_up(url: str, expected: int) -> bool:
    return len(_result(url, f'up{{namespace="{NAMESPACE}"}} == 1')) == expected


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping every service (every target scraped once already); yields
    its base URL. It starts before any traffic, so every observation lands between scrapes."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not found: install the Debian package 'prometheus' (.ci/run does)")
    folder: Path = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(stack)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(lambda: _ready(url) or process.poll() is not None, 30, "prometheus ready")
        assert process.poll() is None, (folder / "prometheus.log").read_text()
        _wait_for(lambda: _targets_up(url, len(stack.services)), 30, "every target up")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


# -- traffic through the gateway --------------------------------------------------------------


@dataclass
class User:
    name: str
    auth: dict[str, str]
    token: str


@dataclass
class Traffic:
    """What the traffic did, for the assertions."""

    started: float  # wall clock, for range queries
    timings: dict[str, float] = field(default_factory=dict)
    webhook_hits: int = 0
    watch_frames: int = 0
    payout_states: list[str] = field(default_factory=list)


class Api:
    """The gateway over HTTP/JSON, as an app calls it."""

    def __init__(self, http: httpx.AsyncClient, diagnose: Callable[[], str]) -> None:
        self.http = http
        self.diagnose = diagnose

    async def sign_up(self, prefix: str) -> User:
        reply = await self.http.post(
            "/v1/users",
            json={
                "user": {"handle": f"{prefix[:8]}_{uuid.uuid4().hex[:6]}", "displayName": prefix},
                "password": PASSWORD,
                "requestId": str(uuid.uuid4()),
            },
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        token = body["tokens"]["accessToken"]
        return User(body["user"]["name"], {"Authorization": f"Bearer {token}"}, token)

    async def post(self, path: str, user: User | None, status: int = 200, **body: Any) -> Any:
        reply = await self.http.post(path, json=body, headers=user.auth if user else {})
        assert reply.status_code == status, f"POST {path}: {reply.status_code} {reply.text}"
        return reply.json()

    async def post_once_known(self, path: str, user: User, **body: Any) -> Any:
        """POST to payments about a Space it learns of from rooms' events (asynchronously):
        retried while payments does not know the Space yet."""
        deadline = time.monotonic() + 30
        while True:
            reply = await self.http.post(path, json=body, headers=user.auth)
            unknown = reply.status_code == 404 and "SPACE_NOT_FOUND" in reply.text
            if not unknown or time.monotonic() > deadline:
                assert reply.status_code == 200, (
                    f"POST {path}: {reply.status_code} {reply.text}\n{self.diagnose()}"
                )
                return reply.json()
            await asyncio.sleep(0.2)

    async def get(self, path: str, user: User | None, status: int = 200) -> Any:
        reply = await self.http.get(path, headers=user.auth if user else {})
        assert reply.status_code == status, f"GET {path}: {reply.status_code} {reply.text}"
        return reply.json()


async def _connect_media(api: Api, user: User, space: str, app: App) -> None:
    """JoinSpace, then Negotiate on the granted node, as an app does."""
    joined = await api.post(f"/v1/{space}:join", user, requestId=str(uuid.uuid4()))
    grant = joined["mediaGrant"]
    await app.pc.setLocalDescription(await app.pc.createOffer())
    answer = await api.post(
        f"/v1/mediaNodes/{grant['endpoint']['node']}/sessions:negotiate",
        user,
        grant=grant["token"],
        sdpOffer=app.pc.localDescription.sdp,
    )
    await app.pc.setRemoteDescription(RTCSessionDescription(answer["sdpAnswer"], "answer"))
    app.recorder = SlotRecorder([t.receiver.track for t in app.slot_transceivers])
    app.session = answer["session"]


async def _until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll an async zero-argument callable until it returns something true."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def _seen_by_prometheus(url: str, selector: str) -> bool:
    return bool(_result(url, f"count({selector})"))


def _above_zero(url: str, query: str) -> Callable[[], Awaitable[bool]]:
    """A check for :func:`_until`: the query answers something above 0 now."""

    async def check() -> bool:
        return await asyncio.to_thread(_has_data, url, f"{query} > 0")

    return check


async def _scraped(url: str, selector: str) -> None:
    """Wait until Prometheus has scraped a series. A labelled series is born with its first
    increment, which rate() never sees: the same event again after this shows on the panel."""
    await _until(lambda: asyncio.to_thread(_seen_by_prometheus, url, selector), 15, selector)


async def _watch(url: str, frames: list[dict[str, Any]]) -> None:
    """A WatchSpace WebSocket, read until the server closes it (the Space ends)."""
    with contextlib.suppress(Exception):
        async with connect(url) as ws:
            async for message in ws:
                frames.append(json.loads(message))


async def _glance(url: str) -> None:
    """A WatchSpace WebSocket that takes the first frame and closes (watch end: closed)."""
    async with connect(url) as ws:
        json.loads(await asyncio.wait_for(ws.recv(), 10))


async def _failures(api: Api, host: User, buyer: User, ticketed: str) -> None:
    """A declined card, a processor timeout (UNAVAILABLE: a server fault) and bad requests,
    for the error panels."""
    for card, status in ((CARD_DECLINED, 400), (TOKEN_TIMEOUT, 503)):
        await api.post(
            f"/v1/{ticketed}/tickets",
            buyer,
            status,
            requestId=str(uuid.uuid4()),
            paymentMethod=card,
            price=TICKET_PRICE,
        )
    await api.post("/v1/spaces", host, 400, space={"title": ""}, requestId=str(uuid.uuid4()))
    await api.get("/v1/spaces/nosuchspace", host, 404)
    await api.get("/v1/users/me", None, 401)


async def _buy_and_refund(api: Api, host: User, buyer: User, ticketed: str) -> None:
    bought = await api.post(
        f"/v1/{ticketed}/tickets",
        buyer,
        requestId=str(uuid.uuid4()),
        paymentMethod=CARD_OK,
        price=TICKET_PRICE,
    )
    await api.post(f"/v1/{bought['ticket']['name']}:refund", host, note="changed plans")


async def _pay_out(api: Api, host: User) -> str:
    """Request a payout and wait until the worker completed it; its final state."""
    payout = await api.post(
        f"/v1/{host.name}/payouts", host, amount=PAYOUT, requestId=str(uuid.uuid4())
    )

    async def completed() -> str:
        got = await api.get(f"/v1/{payout['payout']['name']}", host)
        state: str = got["payout"]["state"]
        return "" if state == "STATE_PENDING" else state

    state: str = await _until(completed, 15, "the payout completed")
    return state


def _selector(metric: str, labels: str = "") -> str:
    return f'{metric}{{namespace="{NAMESPACE}"{", " + labels if labels else ""}}}'


def _event_streams(stack: Stack) -> str:
    """Where rooms' events stand in Redis (for a failure message)."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        stream = "spaces:events:rooms"
        found: Any = client.xrange(stream, count=50)
        entries = [(i, f.get(b"type")) for i, f in found]
        return f"{stream}: {entries}\ngroups: {client.xinfo_groups(stream)}"
    except redis.RedisError as error:
        return f"(redis: {error})"
    finally:
        client.close()


async def _drive(stack: Stack, prometheus: str, webhook_url: str) -> Traffic:
    done = Traffic(started=time.time())
    t0 = time.monotonic()
    port = stack.services["gateway"].http_port
    ws_base = f"ws://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        api = Api(http, lambda: _event_streams(stack))
        host, guest, other, buyer, fan, decliner = await asyncio.gather(
            *(api.sign_up(p) for p in ("host", "guest", "other", "buyer", "fan", "decliner"))
        )
        # Follows: SpaceScheduled and SpaceStarted fan out to these followers.
        for follower in (guest, other, buyer, fan, decliner):
            await api.post(f"/v1/{host.name}:follow", follower)
        # The host's webhook receives every notification of theirs, and answers 500.
        await api.post(
            f"/v1/{host.name}/webhooks",
            host,
            webhook={"url": webhook_url},
            requestId=str(uuid.uuid4()),
        )

        # A scheduled ticketed Space, starting within the reminder lead: a purchase and its
        # refund, a decline, a processor timeout, bad requests.
        start = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
        scheduled = await api.post(
            "/v1/spaces",
            host,
            space={
                "title": "Ticketed",
                "ticketed": True,
                "scheduledStartTime": start.isoformat().replace("+00:00", "Z"),
            },
            requestId=str(uuid.uuid4()),
        )
        ticketed = scheduled["space"]["name"]
        await api.post_once_known(
            f"/v1/{ticketed}/ticketOffering",
            host,
            ticketOffering={"price": TICKET_PRICE, "capacity": 10},
            requestId=str(uuid.uuid4()),
        )
        await _buy_and_refund(api, host, buyer, ticketed)
        await _failures(api, host, decliner, ticketed)
        done.timings["scheduled_space"] = time.monotonic() - t0
        await _scraped(prometheus, _selector("spaces_payments_refunds_total"))
        await _scraped(prometheus, _selector("spaces_payments_declines_total"))

        # A live Space with real audio: the host speaks, the guest (a listener) sends audio
        # it may not publish (drops), the other listens and watches the Space's events.
        created = await api.post(
            "/v1/spaces", host, space={"title": "Scraped live"}, requestId=str(uuid.uuid4())
        )
        space = created["space"]["name"]
        frames: list[dict[str, Any]] = []
        watcher = asyncio.create_task(
            _watch(f"{ws_base}/v1/{space}:watch?access_token={other.token}", frames)
        )
        apps = [App("host", Tone(440, 0.3)), App("guest", Tone(660, 0.3)), App("other", None)]
        try:
            await _connect_media(api, host, space, apps[0])
            await _connect_media(api, guest, space, apps[1])
            await _connect_media(api, other, space, apps[2])
            assert await eventually(lambda: heard(apps[1], 440) and heard(apps[2], 440), 20.0)
            done.timings["audio_heard"] = time.monotonic() - t0
            for emoji in ("EMOJI_HEART", "EMOJI_JOY", "EMOJI_HUNDRED"):
                await api.post(f"/v1/{space}:sendReaction", other, emoji=emoji)
            await api.post(f"/v1/{space}:requestToSpeak", guest)
            await api.post_once_known(
                f"/v1/{space}/tips",
                other,
                requestId=str(uuid.uuid4()),
                recipient=host.name,
                amount=TIP,
                paymentMethod="tok_visa",
                message="great show",
            )
            # The scheduled Space's events again, now that their series were scraped.
            await _buy_and_refund(api, host, fan, ticketed)
            await _failures(api, host, decliner, ticketed)
            # Two more watchers come and go (streams opened, watch ends: closed), one scrape
            # apart.
            await _scraped(prometheus, _selector("spaces_gateway_websocket_streams_total"))
            await _glance(f"{ws_base}/v1/{space}:watch?access_token={host.token}")
            await _scraped(prometheus, _selector("spaces_rooms_live_watch_ends_total"))
            await _glance(f"{ws_base}/v1/{space}:watch?access_token={guest.token}")
            # The Space stays live until Prometheus has seen it all: forwarded packets, drops,
            # the listeners' RTCP receiver reports (with RTT), peers, watchers, the gauges.
            for live in (
                f"sum(increase({_selector('spaces_media_forward_latency_seconds_count')}[1m]))",
                f"sum(increase({_selector('spaces_media_packets_dropped_total')}[1m]))",
                f"sum(increase({_selector('spaces_media_round_trip_time_seconds_count')}[1m]))",
                f"sum(increase({_selector('spaces_media_receiver_jitter_seconds_count')}[1m]))",
                f"sum({_selector('spaces_media_peers')})",
                f"sum({_selector('spaces_rooms_live_watchers')})",
                f"max({_selector('spaces_rooms_live_spaces')})",
                f"max({_selector('spaces_rooms_participants')})",
            ):
                assert not watcher.done(), f"the watch ended early: {frames[-1:]}"
                await _until(_above_zero(prometheus, live), 20, f"{live} > 0 in Prometheus")
            assert frames, "the watcher got the Space's events"
            assert not watcher.done(), f"the watch ended early: {frames[-1:]}"
            await api.post(f"/v1/{space}:end", host)
            await asyncio.wait_for(watcher, 15)
            done.watch_frames = len(frames)
        finally:
            watcher.cancel()
            for app in apps:
                await app.close()
        done.timings["live_space"] = time.monotonic() - t0

        # The Space's end settles the tip into the host's available balance: two payouts,
        # one scrape apart.
        async def available() -> bool:
            balance = await api.get(f"/v1/{host.name}/balance", host)
            for entry in balance["balance"].get("balances", []):
                if int(entry.get("available", {}).get("amountMinor", 0)) >= 2000:
                    return True
            return False

        await _until(available, 15, "the tip settled")
        # The payouts notify the host, whose webhook fails again after this scrape.
        await _scraped(prometheus, _selector("spaces_notify_webhook_failures_total"))
        hits_before = len(FailingReceiver.hits)
        done.payout_states.append(await _pay_out(api, host))
        await _scraped(prometheus, _selector("spaces_payments_payouts_total"))
        done.payout_states.append(await _pay_out(api, host))
        # A reminder for a Space starting within the reminder lead falls due at once.
        await api.post(f"/v1/{ticketed}/reminders", buyer)

        async def reminded() -> bool:
            inbox = await api.get(f"/v1/{buyer.name}/notifications", buyer)
            kinds = {n.get("kind") for n in inbox.get("notifications", [])}
            return "NOTIFICATION_KIND_SPACE_REMINDER" in kinds

        await _until(reminded, 15, "the reminder sent")

        async def delivered_again() -> bool:
            return len(FailingReceiver.hits) > hits_before

        await _until(delivered_again, 15, "the payouts' webhook deliveries")
        done.webhook_hits = len(FailingReceiver.hits)
        done.timings["done"] = time.monotonic() - t0
    return done


@pytest.fixture(scope="module")
async def traffic(stack: Stack, prometheus: str, webhook_receiver: str) -> AsyncIterator[Traffic]:
    with pytest.MonkeyPatch.context() as patch:
        # aioice skips 127.0.0.1 when gathering; the test apps must use nothing else.
        patch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
        done = await _drive(stack, prometheus, webhook_receiver)
    print(f"traffic: {done.timings} (s), watcher frames {done.watch_frames}")
    yield done


@pytest.fixture(scope="module")
def scraped(stack: Stack, traffic: Traffic) -> dict[str, str]:
    """Each service's /metrics text."""
    texts = {}
    for name, running in stack.services.items():
        with urllib.request.urlopen(
            f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10
        ) as reply:
            texts[name] = reply.read().decode()
    return texts


def _exported(text: str) -> set[str]:
    return series_names(text_string_to_metric_families(text))


def _with_samples(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


# -- the tests ----------------------------------------------------------------------------------


def test_every_service_exports_spaces_metrics(stack: Stack, scraped: dict[str, str]) -> None:
    for name, text in scraped.items():
        exported = _exported(text)
        if stack.services[name].grpc_port is not None:
            assert "spaces_rpc_server_handled_total" in exported, name
        assert any(series.startswith(f"spaces_{name}_") for series in exported), name
    identity_rpcs = _with_samples(scraped["identity"])
    assert "spaces_rpc_server_handled_total" in identity_rpcs, "the sign-ups were counted"


def test_every_metric_a_dashboard_reads_is_exported(scraped: dict[str, str]) -> None:
    exported = set().union(*(_exported(text) for text in scraped.values()))
    read = set().union(*(metric_names(expr) for _, _, expr in dashboard_queries()))
    # A service whose process is not written yet cannot be scraped; its names are checked
    # against its code by tests/chart/test_dashboards.py.
    unbuilt = tuple(f"spaces_{spec.name}_" for spec in SERVICES if not spec.is_built())
    required = {m for m in read if not m.startswith(unbuilt)} - set(PENDING_METRICS)
    assert {"spaces_rooms_live_watchers", "spaces_payments_ledger_imbalance"} <= required
    missing = required - exported
    assert missing == set(), f"dashboards read metrics the running suite does not export: {missing}"


def test_prometheus_scrapes_every_service(prometheus: str, stack: Stack) -> None:
    _wait_for(lambda: _targets_up(prometheus, len(stack.services)), 30, "every target up")
    by_service = _result(prometheus, 'count by (service) ({__name__=~"spaces_.+"})')
    services = {r["metric"]["service"] for r in by_service}
    assert services == {f"spaces-{name}" for name in stack.services}


def _values(url: str, promql: str) -> list[float]:
    """The numbers a query answers (NaN is no data: a quantile of a histogram nothing was
    observed in)."""
    values = (float(r["value"][1]) for r in _result(url, promql))
    return [v for v in values if math.isfinite(v)]


def _has_data(url: str, promql: str) -> bool:
    """Whether a query answers at least one series with a number."""
    return bool(_values(url, promql))


def _range_values(url: str, promql: str, start: float, end: float) -> list[float]:
    """Every number a query answers over a time range, step one scrape (as a panel does)."""
    address = f"{url}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": promql, "start": start, "end": end, "step": SCRAPE_INTERVAL_S}
    )
    with urllib.request.urlopen(address, timeout=10) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    assert answer["status"] == "success", f"{promql}: {answer}"
    values = (float(v) for r in answer["data"]["result"] for _, v in r["values"])
    return [v for v in values if math.isfinite(v)]


def _allowed(expr: str, allowed: set[str]) -> bool:
    return metric_names(expr) <= allowed


def test_prometheus_answers_every_dashboard_query_with_data(
    prometheus: str, traffic: Traffic, scraped: dict[str, str]
) -> None:
    assert traffic.payout_states == ["STATE_PAID", "STATE_PAID"]
    assert traffic.webhook_hits >= 2
    exported = set().union(*(_exported(text) for text in scraped.values()))
    # A pending metric is allowed no data only while no service exports it.
    no_data_allowed = set(NO_DATA_ALLOWED) | {m for m in PENDING_METRICS if m not in exported}
    queries = [
        (stem, title, concrete_query(expr, NAMESPACE)) for stem, title, expr in dashboard_queries()
    ]

    def without_data() -> list[tuple[str, str, str]]:
        return [
            (stem, title, query)
            for stem, title, query in queries
            if not _allowed(query, no_data_allowed) and not _has_data(prometheus, query)
        ]

    def flat(end: float) -> list[tuple[str, str, str]]:
        return [
            (stem, title, query)
            for stem, title, query in queries
            if not _allowed(query, set(ZERO_ALLOWED) | no_data_allowed)
            and not any(_range_values(prometheus, query, traffic.started, end))
        ]

    # Every query answers data once Prometheus has scraped what the traffic did; and over
    # the traffic, as a panel shows it, every query but the allowed ones moved off 0.
    deadline = time.monotonic() + 20
    while True:
        missing, stayed_flat = without_data(), flat(time.time())
        if not (missing or stayed_flat) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    per_board: dict[str, list[int]] = {}
    for stem, _, query in queries:
        counts = per_board.setdefault(stem, [0, 0])
        counts[0] += _has_data(prometheus, query)
        counts[1] += 1
    print("queries with data / total:", {s: f"{c[0]}/{c[1]}" for s, c in per_board.items()})
    print("allowed without data:", sorted(no_data_allowed))
    assert missing == [], "dashboard queries without data:\n" + "\n".join(
        f"  {stem}/{title}: {query}" for stem, title, query in missing
    )
    assert stayed_flat == [], "dashboard queries at 0 through the traffic:\n" + "\n".join(
        f"  {stem}/{title}: {query}" for stem, title, query in stayed_flat
    )
    # The ledger check ran over this traffic (purchases, refunds, tip, payouts): it balances.
    imbalance = _values(prometheus, f"max({_selector('spaces_payments_ledger_imbalance')})")
    assert imbalance == [0.0]
