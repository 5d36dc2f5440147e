"""The media engine with real aiortc peers on loopback: audio is forwarded without decoding
in media and decoded by the listening apps here."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.common.errors import PermissionDenied
from services.media.engine import MediaEngine
from services.media.peer import Peer
from tests.integration.media.conftest import AppFactory
from tests.integration.media.peers import Tone, eventually, heard

SPACE = "space-1"
SILENCE_RMS = 50.0
LOUD_RMS = 500.0


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": reason}) or 0


async def test_a_speaker_reaches_three_listeners_decoded_there(
    engine: MediaEngine, apps: AppFactory
) -> None:
    speaker = await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    listeners = [await apps(f"l{i}").join(engine, SPACE, may_publish=False) for i in range(3)]

    assert await eventually(lambda: all(heard(app, 440) for app in listeners))
    for app in listeners:
        slot = app.slots[0]
        assert slot.recent_rms() > LOUD_RMS, "the tone is well above silence"
        assert all(not s.rms for s in app.slots[1:]), "the empty slots stay quiet"
    assert engine.slot_speakers(SPACE, "l0") == ["alice", None, None]
    assert engine.stats().publishers == 1 and engine.stats().listeners == 3
    assert not speaker.slots[0].rms, "nobody else talks: the speaker hears nothing"


async def test_muting_makes_it_silence_within_200_ms(engine: MediaEngine, apps: AppFactory) -> None:
    await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    listener = await apps("bob").join(engine, SPACE, may_publish=False)
    assert await eventually(lambda: heard(listener, 440))
    muted_before = dropped("muted")

    engine.update_permissions(SPACE, "alice", may_publish=True, muted=True)
    t0 = time.monotonic()
    await asyncio.sleep(0.8)

    late = listener.slots[0].since(t0 + 0.2)
    assert all(rms < SILENCE_RMS for rms in late), "loud audio after 200 ms"
    assert dropped("muted") > muted_before, "the muted speaker's packets are counted"
    assert engine.slot_speakers(SPACE, "bob") == [None, None, None]

    engine.update_permissions(SPACE, "alice", may_publish=True, muted=False)
    t1 = time.monotonic()
    assert await eventually(lambda: listener.slots[0].since(t1) and heard(listener, 440))


async def test_a_listener_without_publish_permission_is_never_heard(
    engine: MediaEngine, apps: AppFactory
) -> None:
    speaker = await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    sneaky = await apps("mallory", Tone(880, 0.5)).join(engine, SPACE, may_publish=False)
    other = await apps("bob").join(engine, SPACE, may_publish=False)
    before = dropped("not_permitted")

    assert await eventually(lambda: heard(other, 440) and heard(sneaky, 440))
    await asyncio.sleep(0.5)
    for app in (speaker, sneaky, other):
        assert not heard(app, 880), f"{app.name} heard the listener's own audio"
    assert dropped("not_permitted") - before > 10, "the listener's RTP is dropped and counted"
    assert "mallory" not in engine.slot_speakers(SPACE, "bob")
    assert [level.participant for level in engine.levels(SPACE)] == ["alice"]


async def test_speakers_never_hear_themselves(engine: MediaEngine, apps: AppFactory) -> None:
    alice = await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    carol = await apps("carol", Tone(660, 0.3)).join(engine, SPACE, may_publish=True)

    assert await eventually(lambda: heard(alice, 660) and heard(carol, 440))
    await asyncio.sleep(0.3)
    assert not heard(alice, 440) and not heard(carol, 660)
    assert engine.slot_speakers(SPACE, "alice") == ["carol", None, None]
    assert engine.slot_speakers(SPACE, "carol") == ["alice", None, None]


async def test_each_listener_receives_exactly_the_three_loudest_of_five(
    engine: MediaEngine, apps: AppFactory
) -> None:
    # Levels about 6 dB apart: -10, -16, -22, -28 and -34 dBov (RMS of the sine).
    tones = [(300.0, 0.45), (500.0, 0.225), (700.0, 0.113), (900.0, 0.056), (1100.0, 0.028)]
    for i, (freq, amplitude) in enumerate(tones):
        await apps(f"s{i}", Tone(freq, amplitude)).join(engine, SPACE, may_publish=True)
    listeners = [await apps(f"l{i}").join(engine, SPACE, may_publish=False) for i in range(2)]
    loudest = {300.0, 500.0, 700.0}

    def hears_loudest(app_index: int) -> bool:
        freqs = listeners[app_index].frequencies()
        found = {t for t in loudest for f in freqs if f is not None and abs(f - t) < 25}
        return found == loudest

    assert await eventually(lambda: hears_loudest(0) and hears_loudest(1), timeout=10)

    def exactly_the_loudest(app_index: int) -> bool:
        app = listeners[app_index]
        freqs = [f for f in app.frequencies() if f is not None]
        quiet = any(abs(f - q) < 25 for f in freqs for q in (900.0, 1100.0))
        return len(freqs) == 3 and not quiet and hears_loudest(app_index)

    await asyncio.sleep(0.5)
    assert await eventually(lambda: exactly_the_loudest(0) and exactly_the_loudest(1))
    for app in listeners:
        assert set(engine.slot_speakers(SPACE, app.name)) == {"s0", "s1", "s2"}
    levels = engine.levels(SPACE)
    assert [level.participant for level in levels] == ["s0", "s1", "s2", "s3", "s4"]
    # s3 is forwarded only to the three loudest (their own three loudest others).
    assert [level.forwarded for level in levels] == [True, True, True, True, False]
    assert set(engine.slot_speakers(SPACE, "s0")) == {"s1", "s2", "s3"}


async def test_revoking_publish_stops_forwarding_at_once(
    engine: MediaEngine, apps: AppFactory
) -> None:
    await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    listener = await apps("bob").join(engine, SPACE, may_publish=False)
    assert await eventually(lambda: heard(listener, 440))
    sent = REGISTRY.get_sample_value("spaces_media_packets_sent_total") or 0

    engine.update_permissions(SPACE, "alice", may_publish=False)
    await engine.flush()
    sent_at_revoke = REGISTRY.get_sample_value("spaces_media_packets_sent_total") or 0
    await asyncio.sleep(0.5)
    await engine.flush()

    assert sent_at_revoke >= sent
    assert (REGISTRY.get_sample_value("spaces_media_packets_sent_total") or 0) == sent_at_revoke
    assert engine.stats().publishers == 0 and engine.stats().listeners == 2


async def test_a_promoted_listener_is_heard_but_not_by_themselves(
    engine: MediaEngine, apps: AppFactory
) -> None:
    alice = await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    bob = await apps("bob", Tone(660, 0.3)).join(engine, SPACE, may_publish=False)
    assert await eventually(lambda: heard(bob, 440))
    assert not heard(alice, 660)

    engine.update_permissions(SPACE, "bob", may_publish=True, revision=1)
    assert await eventually(lambda: heard(alice, 660))
    await asyncio.sleep(0.3)
    assert heard(bob, 440) and not heard(bob, 660)
    # An older revision arriving late changes nothing.
    assert not engine.update_permissions(SPACE, "bob", may_publish=False, revision=0)
    assert engine.slot_speakers(SPACE, "alice") == ["bob", None, None]


async def test_removing_a_participant_closes_their_session_and_bars_them(
    engine: MediaEngine, apps: AppFactory
) -> None:
    await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    listener = await apps("bob").join(engine, SPACE, may_publish=False)
    assert await eventually(lambda: heard(listener, 440))

    await engine.remove(SPACE, "alice")
    t0 = time.monotonic()
    await asyncio.sleep(0.6)
    assert all(rms < SILENCE_RMS for rms in listener.slots[0].since(t0 + 0.2))
    assert engine.stats().sessions == 1
    again = await apps("alice-again", Tone(440, 0.3)).pc.createOffer()
    with pytest.raises(PermissionDenied) as refused:
        await engine.negotiate(SPACE, "alice", again.sdp, may_publish=True)
    assert refused.value.reason == "PARTICIPANT_REMOVED"


async def test_listeners_receiver_reports_feed_the_metrics(
    engine: MediaEngine, apps: AppFactory
) -> None:
    def count(name: str) -> float:
        return REGISTRY.get_sample_value(f"{name}_count") or 0

    rtt, loss, jitter = (
        count("spaces_media_round_trip_time_seconds"),
        count("spaces_media_receiver_loss_ratio"),
        count("spaces_media_receiver_jitter_seconds"),
    )
    await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    await apps("bob").join(engine, SPACE, may_publish=False)
    # aiortc reports every 0.5-1.5 s; media sends SRs every 0.25-0.75 s here.
    assert await eventually(lambda: count("spaces_media_round_trip_time_seconds") > rtt, timeout=10)
    assert count("spaces_media_receiver_loss_ratio") > loss
    assert count("spaces_media_receiver_jitter_seconds") > jitter
    assert (REGISTRY.get_sample_value("spaces_media_forward_latency_seconds_count") or 0) > 0


async def test_levels_are_published_a_few_times_a_second(
    engine: MediaEngine, apps: AppFactory
) -> None:
    await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    snapshots = []
    started = time.monotonic()
    async for levels in engine.watch_levels(SPACE):
        snapshots.append(levels)
        if len(snapshots) == 6:
            break
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, "about four snapshots a second"
    last = snapshots[-1][0]
    assert last.participant == "alice" and last.speaking and -20 < last.dbov < -5


async def test_sessions_off_the_mux_use_aiortcs_own_paths(
    engine: MediaEngine, apps: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose ICE pair is not on the mux (a TURN relay in production) is served
    by aiortc's DTLS transport: ingress through the intercepted SRTP handlers, egress
    through aiortc's protect-and-send (FallbackSender)."""
    monkeypatch.setattr(Peer, "muxed_protocol", lambda self: None)
    await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    listener = await apps("bob").join(engine, SPACE, may_publish=False)

    assert await eventually(lambda: heard(listener, 440))
    assert listener.slots[0].recent_rms() > LOUD_RMS
    engine.update_permissions(SPACE, "alice", may_publish=True, muted=True)
    t0 = time.monotonic()
    await asyncio.sleep(0.6)
    assert all(rms < SILENCE_RMS for rms in listener.slots[0].since(t0 + 0.2))


async def test_a_sample_of_fanouts_is_traced_from_arrival_to_send(
    engine: MediaEngine, apps: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.media import egress

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(egress, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(egress, "TRACE_EVERY", 10)

    await apps("alice", Tone(440, 0.3)).join(engine, SPACE, may_publish=True)
    listeners = [await apps(f"l{i}").join(engine, SPACE, may_publish=False) for i in range(2)]
    assert await eventually(lambda: all(heard(app, 440) for app in listeners))

    def spans_to_both() -> list[Any]:
        return [
            span
            for span in exporter.get_finished_spans()
            if span.attributes is not None and span.attributes["spaces.media.listeners"] == 2
        ]

    assert await eventually(lambda: bool(spans_to_both()))
    span = spans_to_both()[-1]
    assert span.name == "media.forward"
    assert span.start_time is not None and span.end_time is not None
    assert 0 < span.end_time - span.start_time < 1e9, "arrival to send, well under a second"
