"""Hostile WebSocket clients against the real gateway (a double behind it, uvicorn
configured as the gateway's main does): mangled upgrade paths and queries, junk
subprotocols, and frames a stream never asks for (text, binary, oversized, floods). The
gateway answers every bad request with a status (an HTTP 4xx refusal, or a close with
4000 + the HTTP status, never 4500 and up: no internal error), ignores client frames,
closes on an oversized one with 1009, and keeps serving everyone else. The same rules hold
for upgrades, subprotocols and frames Hypothesis makes up (derandomized: the same examples
every run)."""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections import Counter
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from services.gateway.main import WS_MAX_FRAME_BYTES
from tests.integration.gateway.conftest import GatewayUnderTest, endless, ws_url

WATCH = "/spaces.rooms.v1.RoomsService/WatchSpace"


@pytest.fixture
def streaming(gw: GatewayUnderTest) -> GatewayUnderTest:
    gw.double.streams[WATCH] = endless
    return gw


async def outcome(url: str, **options: Any) -> tuple[str, int | None]:
    """How the gateway treats one connection: ``("stream", None)`` when frames flow,
    ``("closed", code)`` when it closes first, ``("refused", status)`` when the upgrade
    itself is refused."""
    try:
        async with connect(url, open_timeout=5, close_timeout=2, **options) as ws:
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            except ConnectionClosed:
                return "closed", ws.close_code
            if "error" in frame:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
                return "closed", ws.close_code
            return "stream", None
    except InvalidHandshake as error:
        response = getattr(error, "response", None)
        return "refused", getattr(response, "status_code", None)


HOSTILE_PATHS = [
    "/v1/spaces/%ff%fe:watch",  # not UTF-8 once decoded
    "/v1/spaces/%00:watch",
    "/v1/spaces/%zz:watch",  # not a percent escape
    "/v1/spaces/" + "a" * 8000 + ":watch",
    "/v1/spaces/abc:watch?resume_token=" + "r" * 60_000,  # past websockets' 8 KiB line
    "/v1/spaces/abc:watch?resume_token=%ff%00",
    "/v1/spaces/abc:watch?resume_token=a&resume_token=b",
    "/v1/spaces/abc:watch?name=spaces/other",  # a path field again, from the query
    "/v1/spaces/abc:watch?unknown_field=1",
    "/v1/spaces/abc:watch?access_token=not.a.jwt",
    "/v1/spaces/a/b/c:watch",
    "/v1/spaces/..%2f..%2fadmin:watch",
    "/v1/spaces/abc:watchx",
    "/v1/spaces/abc",  # a unary route: not a stream
]


@pytest.mark.parametrize("path", HOSTILE_PATHS, ids=range(len(HOSTILE_PATHS)))
async def test_mangled_upgrades_get_a_status_never_an_internal_error(
    streaming: GatewayUnderTest, path: str
) -> None:
    kind, code = await outcome(ws_url(streaming, path))
    if kind == "closed":
        assert code is not None and 4400 <= code < 4500, (path, code)
    elif kind == "refused":
        assert code is not None and 400 <= code < 500, (path, code)
    # A stream is fine too (the backend decides about odd but well-formed requests).
    assert await outcome(ws_url(streaming, "/v1/spaces/abc:watch")) == ("stream", None)


@pytest.mark.parametrize(
    "subprotocols",
    [["bearer"], ["bearer", "x" * 4000], ["bearer", "not.a.jwt"], ["junk", "bearer", "more"]],
    ids=["no-token", "long-token", "bad-token", "mixed"],
)
async def test_junk_subprotocol_tokens_are_refused_cleanly(
    streaming: GatewayUnderTest, subprotocols: list[str]
) -> None:
    kind, code = await outcome(
        ws_url(streaming, "/v1/spaces/abc:watch"),
        subprotocols=subprotocols,
    )
    assert kind == "stream" or (code is not None and code < 4500 and code != 1011), (kind, code)


async def test_client_frames_are_ignored_and_the_stream_goes_on(
    streaming: GatewayUnderTest,
) -> None:
    rng = random.Random(7)
    async with connect(ws_url(streaming, "/v1/spaces/abc:watch")) as ws:
        await ws.recv()
        for _ in range(500):  # a flood of frames of every kind the stream never reads
            choice = rng.randrange(4)
            if choice == 0:
                await ws.send(rng.randbytes(rng.randrange(1, 2048)))
            elif choice == 1:
                await ws.send("".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(64)))
            elif choice == 2:
                await ws.send('{"resume_token": "t1", "name": "spaces/other"}')
            else:
                await ws.ping(rng.randbytes(16))
        await ws.send(bytes(WS_MAX_FRAME_BYTES - 1024))  # large, within the limit
        sequences = [json.loads(await ws.recv())["events"][0]["sequence"] for _ in range(20)]
    assert len(set(sequences)) == 20, "frames keep flowing, in order"
    assert streaming.double.last().request.name == "spaces/abc"  # type: ignore[attr-defined]


async def test_an_oversized_frame_closes_only_that_connection(
    streaming: GatewayUnderTest,
) -> None:
    async with connect(ws_url(streaming, "/v1/spaces/abc:watch")) as bystander:
        await bystander.recv()
        async with connect(ws_url(streaming, "/v1/spaces/abc:watch"), max_size=None) as ws:
            await ws.recv()
            await ws.send(bytes(WS_MAX_FRAME_BYTES + 1))  # past the gateway's frame limit
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1009, ws.close_code
        for _ in range(5):
            assert "events" in json.loads(await bystander.recv()), "the others are served"


# -- fuzzed: the same rules for whatever Hypothesis makes up --------------------------------

# Reproducible: the same examples every run, and no example database.
_FUZZ = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
_TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
_segments = st.one_of(
    st.binary(max_size=40).map(lambda raw: quote(raw, safe="")),
    st.text(max_size=30).map(lambda text: quote(text, safe="/:%")),
    st.sampled_from(["abc", "..", "%", "%2", "%c3%28", "a/b", ""]),
)
_values = st.one_of(st.text(max_size=60), st.binary(max_size=60).map(lambda raw: raw.hex()))
_fields = st.one_of(
    st.sampled_from(["resume_token", "name", "access_token", "page_size"]), st.text(max_size=12)
)
_queries = st.lists(st.tuples(_fields, _values), max_size=4).map(
    lambda pairs: urlencode(pairs, quote_via=quote)
)
_suffixes = st.sampled_from([":watch", ":watchx", "", ":Watch", ":watch/", "/:watch"])
_subprotocols = st.lists(
    st.one_of(st.sampled_from(["bearer", "junk"]), st.text(_TCHAR, min_size=1, max_size=50)),
    max_size=3,
)
_frames = st.lists(
    st.one_of(st.binary(max_size=512), st.text(max_size=200), st.just(None)), max_size=8
)


async def fuzzed_connection(
    url: str, subprotocols: list[str], frames: list[bytes | str | None]
) -> tuple[str, int | None]:
    """:func:`outcome`, and when a stream opens, client frames (``None``: a ping) sent
    into it must leave it flowing."""
    options: dict[str, Any] = {"subprotocols": subprotocols} if subprotocols else {}
    kind, code = await outcome(url, **options)
    if kind != "stream":
        return kind, code
    async with connect(url, open_timeout=5, close_timeout=2, **options) as ws:
        await asyncio.wait_for(ws.recv(), 5)
        for frame in frames:
            if frame is None:
                await ws.ping()
            else:
                await ws.send(frame)
        await asyncio.wait_for(ws.recv(), 5)
    return kind, code


async def test_fuzzed_upgrades_and_frames_never_get_an_internal_error(
    streaming: GatewayUnderTest,
) -> None:
    loop = asyncio.get_running_loop()
    outcomes: Counter[str] = Counter()

    @settings(_FUZZ, max_examples=60)
    @given(
        segment=_segments,
        suffix=_suffixes,
        query=_queries,
        subprotocols=_subprotocols,
        frames=_frames,
    )
    def check(
        segment: str,
        suffix: str,
        query: str,
        subprotocols: list[str],
        frames: list[bytes | str | None],
    ) -> None:
        path = f"/v1/spaces/{segment}{suffix}" + (f"?{query}" if query else "")
        future = asyncio.run_coroutine_threadsafe(
            fuzzed_connection(ws_url(streaming, path), subprotocols, frames), loop
        )
        kind, code = future.result(timeout=30)
        outcomes[kind] += 1
        if kind == "closed":
            assert code is not None and 4400 <= code < 4500, (path, subprotocols, code)
        elif kind == "refused":
            assert code is not None and 400 <= code < 500, (path, subprotocols, code)

    # Hypothesis runs in a thread; the connections run on this test's loop.
    await loop.run_in_executor(None, check)
    print(f"\nfuzzed WebSocket upgrades: {dict(outcomes)}")
    assert await outcome(ws_url(streaming, "/v1/spaces/abc:watch")) == ("stream", None)


async def test_fuzzed_client_frames_leave_the_stream_flowing(
    streaming: GatewayUnderTest,
) -> None:
    loop = asyncio.get_running_loop()
    url = ws_url(streaming, "/v1/spaces/abc:watch")

    @settings(_FUZZ, max_examples=40)
    @given(subprotocols=st.lists(st.sampled_from(["bearer", "junk"]), max_size=2), frames=_frames)
    def check(subprotocols: list[str], frames: list[bytes | str | None]) -> None:
        future = asyncio.run_coroutine_threadsafe(
            fuzzed_connection(url, subprotocols, frames), loop
        )
        kind, code = future.result(timeout=30)
        # Junk subprotocols may be refused; a stream that opened kept flowing.
        assert kind == "stream" or (code is not None and code < 4500), (kind, code)

    await loop.run_in_executor(None, check)
