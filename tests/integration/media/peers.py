"""Test peers for the media engine: real aiortc apps on loopback.

A :class:`Tone` is a microphone playing a sine (aiortc encodes it as real Opus and puts
its RFC 6464 level in every packet); an :class:`App` is an app's ``RTCPeerConnection``
shaped like the media contract (one publish m-line, K recvonly slots) whose slots are
*decoded here*, in the test, by aiortc's receivers; :class:`SlotRecorder` keeps what
each slot played (arrival time, RMS, dominant frequency).
"""

from __future__ import annotations

import abc
import asyncio
import fractions
import time
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from services.media.engine import MediaEngine

RATE = 48000
FRAME = 960
TIME_BASE = fractions.Fraction(1, RATE)


class PacedTrack(MediaStreamTrack, abc.ABC):
    """A microphone delivering 20 ms frames in real time; subclasses say what it plays."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._sample = 0
        self._start: float | None = None

    @abc.abstractmethod
    def samples(self, start: int, count: int) -> np.ndarray:
        """``count`` 16-bit samples from sample ``start`` on."""

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._sample / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pcm = self.samples(self._sample, FRAME).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._sample
        frame.time_base = TIME_BASE
        self._sample += FRAME
        return frame


class Tone(PacedTrack):
    """A microphone playing a sine tone."""

    def __init__(self, freq: float, amplitude: float) -> None:
        super().__init__()
        self.freq = freq
        self.amplitude = amplitude

    def samples(self, start: int, count: int) -> np.ndarray:
        t = np.arange(start, start + count) / RATE
        return self.amplitude * 32767 * np.sin(2 * np.pi * self.freq * t)


class Speech(PacedTrack):
    """A microphone playing recorded speech (48 kHz mono samples) once, then silence."""

    def __init__(self, recorded: np.ndarray, lead_silence_s: float = 0.5) -> None:
        super().__init__()
        lead = np.zeros(int(lead_silence_s * RATE), dtype=np.int16)
        self.recorded = np.concatenate([lead, recorded.astype(np.int16)])

    def samples(self, start: int, count: int) -> np.ndarray:
        chunk = self.recorded[start : start + count]
        return np.pad(chunk, (0, count - len(chunk)))


@dataclass
class SlotRecord:
    """What one slot played: per decoded frame, arrival time, RMS and samples."""

    times: list[float] = field(default_factory=list)
    rms: list[float] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)

    def since(self, t0: float) -> list[float]:
        """RMS of the frames that arrived after ``t0``."""
        return [r for t, r in zip(self.times, self.rms, strict=True) if t > t0]

    def recent_rms(self, frames: int = 15) -> float:
        """Mean RMS of the last ``frames`` frames (0 when nothing played)."""
        return float(np.mean(self.rms[-frames:])) if self.rms else 0.0

    def dominant_frequency(self, frames: int = 15) -> float | None:
        """The strongest frequency of the last ``frames`` frames (``None``: silence)."""
        if not self.samples or self.recent_rms(frames) < 200:
            return None
        signal = np.concatenate(self.samples[-frames:])
        spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
        return float(np.argmax(spectrum) * RATE / len(signal))


class SlotRecorder:
    """Decodes and records every slot of an app (aiortc's receivers decode)."""

    def __init__(self, tracks: list[MediaStreamTrack]) -> None:
        self.slots = [SlotRecord() for _ in tracks]
        self._tasks = [
            asyncio.create_task(self._consume(track, record))
            for track, record in zip(tracks, self.slots, strict=True)
        ]

    async def _consume(self, track: MediaStreamTrack, record: SlotRecord) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, av.AudioFrame)
            pcm = frame.to_ndarray().astype(np.float64).reshape(-1)
            if len(frame.layout.channels) == 2:
                pcm = pcm.reshape(-1, 2).mean(axis=1)
            record.times.append(time.monotonic())
            record.rms.append(float(np.sqrt(np.mean(pcm * pcm))))
            record.samples.append(pcm)
            if len(record.samples) > 200:
                del record.samples[:100]

    def frequencies(self) -> list[float | None]:
        """The dominant frequency of each slot now."""
        return [slot.dominant_frequency() for slot in self.slots]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()


class App:
    """An app's peer connection with media: optional microphone, K listening slots."""

    def __init__(self, name: str, tone: Tone | None, slots: int = 3) -> None:
        self.name = name
        # Loopback only: no STUN server (aiortc's default would be queried over the network).
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.tone = tone
        if tone is not None:
            self.pc.addTransceiver(tone, direction="sendonly")
        self.slot_transceivers = [
            self.pc.addTransceiver("audio", direction="recvonly") for _ in range(slots)
        ]
        self.session = ""
        self.recorder: SlotRecorder | None = None

    async def offer(self) -> str:
        """Make the app's offer (now its local description): the SDP to send media."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, sdp_answer: str) -> None:
        """Take media's answer and start recording what arrives in the slots."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp_answer, "answer"))
        self.recorder = SlotRecorder([t.receiver.track for t in self.slot_transceivers])

    async def join(self, engine: MediaEngine, space: str, may_publish: bool) -> App:
        """Negotiate with the engine and wait until media forwards to/from the app."""
        result = await engine.negotiate(
            space, self.name, await self.offer(), may_publish=may_publish
        )
        self.session = result.session
        await self.accept(result.sdp_answer)
        await engine.wait_connected(result.session, timeout=20)
        return self

    @property
    def slots(self) -> list[SlotRecord]:
        assert self.recorder is not None
        return self.recorder.slots

    def frequencies(self) -> list[float | None]:
        assert self.recorder is not None
        return self.recorder.frequencies()

    async def close(self) -> None:
        if self.recorder is not None:
            self.recorder.stop()
        await self.pc.close()


def heard(app: App, freq: float, tolerance: float = 25.0) -> bool:
    """Whether one of the app's slots plays ``freq`` now."""
    return any(f is not None and abs(f - freq) < tolerance for f in app.frequencies())


def heard_since(app: App, freq: float, since: float, tolerance: float = 25.0) -> bool:
    """Whether a frame of ``freq`` arrived in one of the app's slots after ``since``
    (frames are judged one by one: a slot that stops receiving keeps its old frames); an
    app still negotiating has heard nothing."""
    if app.recorder is None:
        return False
    for slot in app.slots:
        recent = zip(slot.times[-len(slot.samples) :], slot.samples, strict=True)
        for arrived, pcm in recent:
            if arrived <= since or float(np.sqrt(np.mean(pcm * pcm))) < 200:
                continue
            spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
            peak = float(np.argmax(spectrum)) * RATE / len(pcm)
            if abs(peak - freq) < max(tolerance, RATE / len(pcm)):
                return True
    return False


async def eventually(condition: object, timeout: float = 8.0, interval: float = 0.05) -> bool:
    """Poll a zero-argument callable until it returns true (or time runs out)."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(interval)
    return bool(condition())
