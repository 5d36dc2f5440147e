"""The whole suite on free ports and headless Chromium driving the web client.

Chromium is Debian's (``apt-get install chromium``); Playwright only drives it
(``playwright install`` cannot download browsers here). The fake media flags give every
page a microphone that plays a beep and grant the permission without a prompt.

``SPACES_BROWSER_GATEWAY_URL`` points the tests at a stack that is already running (for
example ``make up``'s) instead of starting one, which saves its start-up while iterating;
``SPACES_BROWSER_ROOMS_ADDR`` and ``SPACES_BROWSER_INTERNAL_SECRET`` (the run folder's
``internal-secret``) then say where rooms is for the calls the tests make themselves.
Screenshots go to ``build/artifacts/browser/`` (CI keeps that folder as an artifact).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.devstack import ROOT, Stack

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "build" / "artifacts" / "browser"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CHROMIUM.exists():
        return
    skip = pytest.mark.skip(
        reason=f"{CHROMIUM} is missing: install Debian's chromium package"
        " (apt-get install chromium) to run the browser tests"
    )
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(skip)


@dataclass(frozen=True)
class Suite:
    """Where the running suite is: the gateway for the pages, rooms for the test's own
    internal calls (it plays the caption worker), and the internal secret for those."""

    gateway_url: str
    rooms_addr: str
    internal_secret: str


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """Every service on free ports (or the stack named by SPACES_BROWSER_* variables)."""
    given = os.environ.get("SPACES_BROWSER_GATEWAY_URL")
    if given:
        yield Suite(
            given.rstrip("/"),
            os.environ.get("SPACES_BROWSER_ROOMS_ADDR", ""),
            os.environ.get("SPACES_BROWSER_INTERNAL_SECRET", ""),
        )
        return
    with Stack(tmp_path_factory.mktemp("browser-stack"), auto_ports=True) as stack:
        gateway = stack.services["gateway"]
        rooms = stack.services["rooms"]
        yield Suite(
            f"http://127.0.0.1:{gateway.http_port}",
            f"127.0.0.1:{rooms.grpc_port}",
            stack.environment()["SPACES_INTERNAL_SECRET"],
        )
        stack.check_alive()  # a service that died during the tests is a failure


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Chromium for one module: Playwright's sync API keeps an event loop running in the
    main thread while it is open, which would break every asyncio test after it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Path:
    """A clean folder for this test's screenshots."""
    folder = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if call.when == "call":
        item.stash[_FAILED] = bool(getattr(report, "failed", False))
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def pages(request: pytest.FixtureRequest, shots: Path) -> Iterator[dict[str, object]]:
    """Pages the test registers by name; each is screenshotted if the test fails."""
    registered: dict[str, object] = {}
    yield registered
    if request.node.stash.get(_FAILED, False):
        for name, page in registered.items():
            try:
                page.screenshot(path=str(shots / f"FAILED-{name}.png"), full_page=True)  # type: ignore[attr-defined]
            except Exception as error:  # a page that is gone cannot be shot; say so
                (shots / f"FAILED-{name}.txt").write_text(f"no screenshot: {error}\n")
