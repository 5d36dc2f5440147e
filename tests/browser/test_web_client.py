"""A host and two listeners use the web client in headless Chromium over real WebRTC.

Each person has a browser context of their own (separate storage, separate fake
microphone). Audio is judged from the receiving page's ``getStats()``: the energy its
inbound audio gained over a window (``totalAudioEnergy`` is the integral of the squared
audio level over time), so "hears the host" means that energy grew by clearly more than
silence would; "muted" means it stopped growing. Every step leaves a screenshot in
``build/artifacts/browser/<test>/``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from spaces.rooms.v1 import rooms_events_pb2
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_res
from spaces.rooms.v1 import rooms_service_pb2 as rooms_pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as rooms_grpc

from services.common.auth import ServiceTokenIssuer
from tests.browser.conftest import Suite

pytestmark = pytest.mark.browser

# Mean power (audio level squared) over a window: Chromium's fake microphone beeps at
# roughly -20 dBFS (power ~1e-2 while it beeps); digital silence and comfort noise stay
# under 1e-6. Thresholds sit far from both.
HEARD_POWER = 1e-4
SILENT_POWER = 1e-5
WINDOW_S = 1.0
PASSWORD = "correct horse battery staple"


@dataclass
class Person:
    """One browser context and page, signed in as one user."""

    name: str
    handle: str
    page: Any
    shots: Path
    step: list[int] = field(default_factory=lambda: [0])

    def shot(self, label: str) -> Path:
        self.step[0] += 1
        path = self.shots / f"{self.step[0]:02d}-{self.name}-{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def sign_up(self, base_url: str, display_name: str) -> None:
        page = self.page
        page.goto(base_url + "/")
        page.get_by_role("tab", name="Sign up").click()
        form = page.locator("#form-signup")
        form.get_by_label("Handle").fill(self.handle)
        form.get_by_label("Display name").fill(display_name)
        form.get_by_label("Password").fill(PASSWORD)
        form.get_by_role("button", name="Create account").click()
        page.locator("#view-home").wait_for(state="visible")
        page.get_by_text(f"@{self.handle}").first.wait_for()

    def check_no_errors(self) -> None:
        """No script error and no error toast (a failing call the UI showed) on the page."""
        toasts = self.page.evaluate("[...window.spacesClient.errors]")
        assert toasts == [], f"{self.name} was shown errors: {toasts}"
        assert self.page.errors == [], f"{self.name}: {self.page.errors}"  # type: ignore[attr-defined]

    def audio_power(self, window_s: float = WINDOW_S) -> tuple[float, dict[str, Any]]:
        """Mean inbound audio power over a window, summed over the slots, and the stats."""
        first = self.page.evaluate("window.spacesClient.stats()")
        time.sleep(window_s)
        second = self.page.evaluate("window.spacesClient.stats()")
        energy = 0.0
        duration = 0.0
        before = {s["mid"]: s for s in first["inbound"]}
        for slot in second["inbound"]:
            old = before.get(slot["mid"], {"totalAudioEnergy": 0.0, "totalSamplesDuration": 0.0})
            energy += slot["totalAudioEnergy"] - old["totalAudioEnergy"]
            duration = max(duration, slot["totalSamplesDuration"] - old["totalSamplesDuration"])
        return energy / max(duration, window_s), second

    def wait_until_hearing(self, timeout_s: float = 15.0) -> float:
        deadline = time.monotonic() + timeout_s
        power, stats = self.audio_power()
        while power < HEARD_POWER and time.monotonic() < deadline:
            power, stats = self.audio_power()
        assert power >= HEARD_POWER, f"{self.name} hears nothing: power {power:.2e}, {stats}"
        return power

    def wait_until_silent(self, timeout_s: float = 10.0) -> float:
        deadline = time.monotonic() + timeout_s
        power, stats = self.audio_power()
        while power > SILENT_POWER and time.monotonic() < deadline:
            power, stats = self.audio_power()
        assert power <= SILENT_POWER, f"{self.name} still hears audio: {power:.2e}, {stats}"
        return power


def wait_until(page: Any, expression: str, timeout_s: float = 10.0) -> Any:
    """Poll a JavaScript expression (awaited when it is a promise) until it is truthy.

    Not ``page.wait_for_function``: it runs a string predicate through the page's own
    ``eval``, which the client's CSP (``script-src 'self'``, no ``'unsafe-eval'``) may
    refuse (a run failed with "EvalError ... violates the following Content Security
    Policy directive"). ``page.evaluate`` goes through DevTools, which CSP does not govern.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        assert time.monotonic() < deadline, f"still false after {timeout_s} s: {expression}"
        time.sleep(0.1)


def _person(
    browser: Any, name: str, shots: Path, step: list[int], pages: dict[str, object]
) -> Person:
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    pages[name] = page
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    handle = f"{name[:8]}{uuid.uuid4().hex[:6]}"
    return Person(name, handle, page, shots, step)


def test_host_and_two_listeners_talk_in_a_space(
    browser: Any, suite: Suite, shots: Path, pages: dict[str, object]
) -> None:
    gateway_url = suite.gateway_url
    step = [0]
    host = _person(browser, "host", shots, step, pages)
    ann = _person(browser, "ann", shots, step, pages)
    bob = _person(browser, "bob", shots, step, pages)
    people = (host, ann, bob)

    # Sign up; the listeners follow the host before the Space starts.
    host.sign_up(gateway_url, "Hana Host")
    for listener, display in ((ann, "Ann Listener"), (bob, "Bob Listener")):
        listener.sign_up(gateway_url, display)
        listener.page.get_by_placeholder("@handle").fill(f"@{host.handle}")
        listener.page.get_by_role("button", name="Follow", exact=True).click()
        listener.page.locator("#following-list").get_by_text(f"@{host.handle}").wait_for()
    ann.shot("follows-host")

    # The host starts a Space.
    page = host.page
    page.get_by_label("Title").fill("Browser test: jazz morning")
    page.get_by_label("Topics").fill("music, jazz")
    page.get_by_role("button", name="Start now").click()
    page.locator("#space-live").wait_for(state="visible")
    page.get_by_text("Audio connected").wait_for(timeout=15_000)
    host.shot("live-muted")

    # Both listeners find it in their live-now row and join.
    for listener in (ann, bob):
        listener.page.get_by_role("button", name="Refresh").click()
        card = listener.page.locator("#live-row a", has_text="Browser test: jazz morning")
        card.wait_for(timeout=10_000)
        if listener is ann:
            listener.shot("live-now-row")
        card.click()
        listener.page.locator("#space-live").wait_for(state="visible")
        listener.page.get_by_text("Audio connected").wait_for(timeout=15_000)
        assert listener.page.get_by_role("button", name="Raise hand").is_visible()
        assert not listener.page.locator("#mic-btn").is_visible()

    # Silence while the host is muted.
    ann.wait_until_silent()

    # The host unmutes and speaks: both listeners hear it.
    page.get_by_role("button", name="Unmute your microphone").click()
    page.get_by_role("button", name="Mute your microphone").wait_for()
    for listener in (ann, bob):
        listener.wait_until_hearing()
    host.shot("speaking")

    # Rooms moves Bob (as media does when a node drains): a media_reconnect event with a
    # fresh grant reaches his page, which connects a new session and keeps listening.
    before = bob.page.evaluate("window.spacesClient.stats()")["session"]
    _request_reconnect(suite, bob.page.evaluate("window.spacesClient.space.me.name"))
    wait_until(
        bob.page,
        f"window.spacesClient.stats().then(s => s.session && s.session !== {before!r})",
        timeout_s=15.0,
    )
    bob.page.get_by_text("Audio connected").wait_for(timeout=15_000)
    bob.wait_until_hearing()
    # Speaking levels reach the page through the event stream and light up the host's tile.
    ann.page.locator("#stage .tile.active", has_text="Hana Host").wait_for(timeout=10_000)
    ann.shot("hears-host")

    # Ann raises her hand; the host approves; Ann unmutes and the host hears her.
    ann.page.get_by_role("button", name="Raise hand").click()
    ann.page.get_by_role("button", name="Lower hand").wait_for()
    hands = page.locator("#hands-list")
    hands.get_by_text("Ann Listener").wait_for(timeout=10_000)
    host.shot("raised-hand")
    page.get_by_role("button", name="Mute your microphone").click()  # hear Ann alone
    page.get_by_role("button", name="Unmute your microphone").wait_for()
    host.wait_until_silent()
    hands.get_by_role("button", name="Approve Ann Listener to speak").click()
    ann.page.get_by_role("button", name="Unmute your microphone").wait_for(timeout=10_000)
    page.locator("#stage").get_by_text("Ann Listener").wait_for()
    ann.shot("on-stage")
    ann.page.get_by_role("button", name="Unmute your microphone").click()
    ann.page.get_by_role("button", name="Mute your microphone").wait_for()
    host.wait_until_hearing()
    bob.wait_until_hearing()
    host.shot("hears-ann")

    # Bob's event stream drops (a network blip) just before Ann mutes.
    bob.page.evaluate("window.spacesClient.space.stream.ws.close(3000)")

    # Ann mutes: the host hears nothing any more.
    ann.page.get_by_role("button", name="Mute your microphone").click()
    ann.page.get_by_role("button", name="Unmute your microphone").wait_for()
    host.wait_until_silent()
    page.locator("#stage .tile", has_text="Ann Listener").get_by_text("muted").wait_for()
    host.shot("ann-muted")
    # Bob's page reconnected with its resume token and caught up with what it missed.
    bob.page.locator("#stage .tile", has_text="Ann Listener").get_by_text("muted").wait_for()
    assert bob.page.evaluate("window.spacesClient.space.stream.opens") == 2
    assert bob.page.evaluate("window.spacesClient.space.eventCounts.snapshot") == 1

    # Bob reacts and tips Ann with the sandbox's test card.
    bob.page.get_by_role("button", name="React with clap").click()
    page.locator("#reactions-live").get_by_text("1 clap").wait_for(state="attached", timeout=10_000)
    bob.page.get_by_role("button", name="Tip").click()
    dialog = bob.page.locator("#pay-dialog")
    dialog.get_by_label("To").select_option(label="Ann Listener (Speaker)")
    dialog.get_by_label("Amount (USD)").fill("3.50")
    dialog.get_by_label("Card number").fill("4000 0000 0000 0002")
    dialog.get_by_role("button", name="Pay").click()
    dialog.get_by_text("The card was declined.").wait_for()
    bob.shot("tip-declined")
    dialog.get_by_label("Card number").fill("4242 4242 4242 4242")
    dialog.get_by_role("button", name="Pay").click()
    bob.page.get_by_text("Tip of $3.50 sent to Ann Listener").wait_for()
    bob.shot("tipped")

    # The host ends the Space; both listeners see it end and their audio closes.
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="End Space").click()
    page.get_by_role("heading", name="This Space has ended").wait_for()
    host.shot("ended")
    for listener in (ann, bob):
        listener.page.get_by_role("heading", name="This Space has ended").wait_for(timeout=10_000)
        stats = listener.page.evaluate("window.spacesClient.stats()")
        assert stats["state"] == "closed"
    bob.shot("ended")

    for person in people:
        person.check_no_errors()
        person.page.context.close()


def _rooms_call(suite: Suite, method: str, request: Any) -> Any:
    """Calls an internal rooms RPC as a service would (the test plays media's part)."""
    assert suite.rooms_addr and suite.internal_secret, "set SPACES_BROWSER_ROOMS_ADDR/_SECRET"
    token = ServiceTokenIssuer("media", suite.internal_secret).token()
    with grpc.insecure_channel(suite.rooms_addr) as channel:
        stub = rooms_grpc.RoomsServiceStub(channel)
        return getattr(stub, method)(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=10
        )


def _request_reconnect(suite: Suite, participant: str) -> None:
    space = "/".join(participant.split("/")[:2])
    _rooms_call(
        suite,
        "RequestMediaReconnect",
        rooms_pb.RequestMediaReconnectRequest(
            name=space,
            participants=[participant],
            reason=rooms_events_pb2.MEDIA_RECONNECT_REASON_REBALANCE,
        ),
    )


def _post_caption(suite: Suite, space: str, speaker: str, segment_id: str, text: str) -> None:
    """What the caption worker does: rooms' internal PostCaptionSegment, as a service."""
    request = rooms_pb.PostCaptionSegmentRequest(
        name=space,
        segment=rooms_res.CaptionSegment(
            segment_id=segment_id,
            speaker=speaker,
            text=text,
            start_offset=duration_pb2.Duration(seconds=1),
            end_offset=duration_pb2.Duration(seconds=3),
            final=True,
            language_code="en",
        ),
    )
    _rooms_call(suite, "PostCaptionSegment", request)


def test_ticketed_space_with_notifications_and_captions(
    browser: Any, suite: Suite, shots: Path, pages: dict[str, object]
) -> None:
    step = [0]
    host = _person(browser, "host", shots, step, pages)
    fan = _person(browser, "fan", shots, step, pages)
    host.sign_up(suite.gateway_url, "Tess Ticketed")
    fan.sign_up(suite.gateway_url, "Fay Fan")
    fan.page.get_by_placeholder("@handle").fill(host.handle)
    fan.page.get_by_role("button", name="Follow", exact=True).click()
    fan.page.locator("#following-list").get_by_text(f"@{host.handle}").wait_for()

    # The host schedules a ticketed Space an hour ahead (the form's default time).
    page = host.page
    page.get_by_label("Title").fill("Ticketed: late night talk")
    page.get_by_label("Schedule for later").check()
    page.get_by_label("Sell tickets").check()
    page.get_by_label("Record this Space").check()
    page.get_by_label("Ticket price (USD)").fill("4.00")
    host.shot("schedule-form")
    page.get_by_role("button", name="Schedule", exact=True).click()
    page.locator("#space-scheduled").wait_for(state="visible")
    page.get_by_text("Tickets: $4.00 — 1000 left").wait_for(timeout=10_000)
    assert page.get_by_role("button", name="Start now").is_visible()
    host.shot("scheduled")

    # The fan is told over the notification WebSocket and opens it from the inbox.
    fan.page.locator("#unread-badge").wait_for(state="visible", timeout=20_000)
    fan.page.get_by_role("link", name="Notifications").click()
    item = fan.page.locator("#notif-list li[data-kind='NOTIFICATION_KIND_SPACE_SCHEDULED']")
    item.wait_for(timeout=10_000)
    fan.shot("inbox")
    item.get_by_role("link").click()

    # Buying a ticket with the sandbox's test card.
    fan.page.get_by_role("button", name="Buy ticket · $4.00").click()
    dialog = fan.page.locator("#pay-dialog")
    assert dialog.get_by_label("Card number").input_value() == "4242 4242 4242 4242"
    fan.shot("buy-ticket")
    dialog.get_by_role("button", name="Pay").click()
    fan.page.get_by_text("You have a ticket ($4.00).").wait_for(timeout=10_000)
    fan.shot("ticket-bought")

    # The host starts it; the fan's page follows the "is hosting" notification and joins.
    page.get_by_role("button", name="Start now").click()
    page.locator("#space-live").wait_for(state="visible", timeout=10_000)
    fan.page.locator("#space-live").wait_for(state="visible", timeout=20_000)
    fan.page.get_by_text("Audio connected").wait_for(timeout=15_000)
    page.get_by_text("Audio connected").wait_for(timeout=15_000)

    # The host goes live muted (as in every Space) and the fan hears nothing; once the
    # host unmutes, the ticket holder hears the host.
    fan.wait_until_silent()
    muted = page.evaluate("window.spacesClient.stats()")["outbound"]
    assert not muted or muted["packetsSent"] == 0, "muted: no packets, not silence"
    page.get_by_role("button", name="Unmute your microphone").click()
    page.get_by_role("button", name="Mute your microphone").wait_for()
    fan.wait_until_hearing()
    sent = page.evaluate("window.spacesClient.stats()")["outbound"]
    assert sent and sent["packetsSent"] > 0, f"the host sends no audio: {sent}"
    fan.shot("hears-host")

    captions = fan.page.get_by_role("button", name="Turn captions on")
    assert captions.is_disabled()  # nothing transcribed yet

    # Captions: once the worker posts a segment the fan may turn them on and read along.
    space = "/".join(page.url.split("#/")[1].split("/")[:2])
    speaker = page.evaluate("window.spacesClient.space.me.name")
    _post_caption(suite, space, speaker, "seg-1", "before anyone turned captions on")
    captions.wait_for(state="visible")
    wait_until(fan.page, "!document.querySelector('#captions-btn').disabled")
    captions.click()
    fan.page.get_by_role("button", name="Turn captions off").wait_for()
    _post_caption(suite, space, speaker, "seg-2", "welcome to the late night talk")
    fan.page.locator("#captions").get_by_text("welcome to the late night talk").wait_for(
        timeout=10_000
    )
    assert "before anyone" not in fan.page.inner_text("#captions")
    fan.shot("captions")
    fan.page.get_by_role("button", name="Turn captions off").click()
    fan.page.locator("#captions").wait_for(state="hidden")

    assert page.get_by_text("● Recording").is_visible()
    # Live for a few seconds before it ends, so there is a recording to play (a Space
    # ended within a second of going live left an empty one).
    time.sleep(3.0)
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="End Space").click()
    fan.page.get_by_role("heading", name="This Space has ended").wait_for(timeout=10_000)
    fan.shot("ended")

    # The host plays the recording back once media has finalized it.
    page.get_by_role("button", name="Play the recording").click(timeout=30_000)
    replay = page.locator("#replay-audio")
    replay.wait_for()
    wait_until(
        page,
        "(() => { const a = document.querySelector('#replay-audio');"
        " return a.readyState >= 1 && a.duration > 0 && !a.error; })()",
    )
    host.shot("replay")
    for person in (host, fan):
        person.check_no_errors()
        person.page.context.close()
