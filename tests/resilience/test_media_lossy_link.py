"""A lossy, jittery link between a speaker and the media node: listeners still hear the
speaker, and media's metrics show the loss and jitter the listeners report.

The link is shaped inside the speaker's own app: every RTP packet its DTLS transport would
send is dropped with 5% probability or delayed by 0 to 50 ms (so packets also arrive out
of order), like ``tc netem loss 5% delay 25ms 25ms`` on the speaker's uplink.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from services.media.config import MediaConfig
from services.media.engine import MediaEngine
from tests.helpers.ice import loopback_ice  # noqa: F401  (autouse)
from tests.integration.media.peers import App, Tone, eventually, heard, heard_since

pytestmark = pytest.mark.resilience

SPACE = "lossy-space"
LOSS = 0.05
MAX_DELAY_S = 0.05


@pytest.fixture
async def engine() -> AsyncIterator[MediaEngine]:
    async with MediaEngine(MediaConfig(rtcp_interval=0.5)) as running:
        yield running


def shape_uplink(app: App, rng: random.Random) -> dict[str, int]:
    """Make the app's RTP leave through a lossy, jittery link; returns its counters."""
    counts = {"sent": 0, "dropped": 0}
    transport = app.pc.getTransceivers()[0].sender.transport
    send = transport._send_rtp
    loop = asyncio.get_running_loop()

    async def lossy_send(data: bytes) -> None:
        if data[1] in range(192, 224):  # RTCP (SR, RR, SDES, BYE, ...) passes untouched
            await send(data)
            return
        if rng.random() < LOSS:
            counts["dropped"] += 1
            return
        counts["sent"] += 1
        loop.call_later(rng.uniform(0, MAX_DELAY_S), lambda: loop.create_task(send(data)))

    transport._send_rtp = lossy_send
    return counts


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_listeners_hear_a_speaker_on_a_lossy_link_and_metrics_show_it(
    engine: MediaEngine,
) -> None:
    speaker = App("alice", Tone(440, 0.3))
    listeners = [App(f"l{i}", None) for i in range(3)]
    try:
        await speaker.join(engine, SPACE, may_publish=True)
        for listener in listeners:
            await listener.join(engine, SPACE, may_publish=False)
        assert await eventually(lambda: all(heard(app, 440) for app in listeners))

        loss_before = sample("spaces_media_receiver_loss_ratio_sum")
        jitter_before = sample("spaces_media_receiver_jitter_seconds_sum")
        reports_before = sample("spaces_media_receiver_loss_ratio_count")
        counts = shape_uplink(speaker, random.Random(20261123))
        shaped = time.monotonic()
        await asyncio.sleep(6.0)  # several RTCP report intervals of the listeners

        assert counts["dropped"] > 0 and counts["sent"] > 0
        drop_rate = counts["dropped"] / (counts["dropped"] + counts["sent"])
        for listener in listeners:
            assert heard_since(listener, 440, shaped + 1.0), "audio survives the lossy link"
        reports = sample("spaces_media_receiver_loss_ratio_count") - reports_before
        loss = sample("spaces_media_receiver_loss_ratio_sum") - loss_before
        jitter = sample("spaces_media_receiver_jitter_seconds_sum") - jitter_before
        assert reports > 0, "listeners kept reporting"
        assert loss > 0, "the loss shows in the receiver-reported loss metric"
        assert jitter > 0
        print(
            f"uplink drop rate {drop_rate:.1%}; {reports:.0f} receiver reports, mean reported "
            f"loss {loss / reports:.1%}, mean jitter {jitter / reports * 1000:.1f} ms"
        )
    finally:
        for app in (speaker, *listeners):
            await app.close()


async def test_a_listener_whose_network_vanishes_is_dropped_within_30_s(
    engine: MediaEngine,
) -> None:
    """RFC 7675: the node stops sending to a peer that stops answering consent checks."""
    speaker = App("alice", Tone(440, 0.3))
    gone = App("gone", None)
    try:
        await speaker.join(engine, SPACE, may_publish=True)
        await gone.join(engine, SPACE, may_publish=False)
        assert await eventually(lambda: heard(gone, 440))
        assert engine.stats().listeners == 1

        # The listener's network vanishes: its socket closes without a word to media.
        connection = gone.pc.getTransceivers()[0].receiver.transport.transport._connection
        for pair in connection._nominated.values():
            pair.protocol.transport.close()
        vanished = time.monotonic()

        assert await eventually(lambda: engine.stats().listeners == 0, timeout=40.0, interval=0.5)
        took = time.monotonic() - vanished
        print(f"the vanished listener's session was closed after {took:.1f} s")
        assert took <= 30.0, "consent freshness: stop sending within 30 s"
        assert engine.session(gone.session) is None, "its resources are freed"
    finally:
        await speaker.close()
        await gone.close()
