"""Recording a Space: the forwarded speakers mixed once into one Ogg/Opus file.

Forwarding never decodes. A recorded Space is the exception the product asks for: its
origin node keeps one :class:`SpaceRecorder`, to which the room hands the Opus payload of
every packet it forwards (the N loudest speakers, so the file holds what listeners hear).
A worker thread decodes each speaker's packets, places them on the recording's timeline by
their RTP timestamps (anchored to the arrival time of a speaker's first packet, re-anchored
after a long gap or a jump), mixes them, and encodes the mix once as 20 ms Opus frames into
an Ogg container. The event loop only appends to a deque; the codec work runs on the thread
(PyAV releases the GIL inside libopus).

Frames are written half a second behind real time, so late packets of a speaker still land
in their frame; silence between speakers is encoded as silence, so the file's duration is
the Space's. A recording that ends before its first frame was written (a Space closed within
half a second of recording) still becomes a playable file, of 0 s: see
:func:`~services.media.ogg.empty_ogg_opus`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from pathlib import Path

import av
import numpy as np

from services.media.ogg import empty_ogg_opus

logger = logging.getLogger(__name__)

__all__ = ["RecordingResult", "SpaceRecorder"]

RATE = 48_000
FRAME = 960
"""Samples of one 20 ms frame at 48 kHz."""
_LAG_S = 0.5
_RESYNC_S = 0.5
_TICK_S = 0.1


@dataclasses.dataclass(frozen=True)
class RecordingResult:
    """A finished recording.

    :param path: the Ogg/Opus file.
    :param duration_s: its length.
    :param size_bytes: its size.
    :param failed: ``True`` when writing failed (the file may be partial).
    """

    path: Path
    duration_s: float
    size_bytes: int
    failed: bool = False


class _Speaker:
    """One speaker's decoder and timeline anchor."""

    __slots__ = ("decoder", "last_timestamp", "offset", "unwrapped")

    def __init__(self) -> None:
        self.decoder = av.CodecContext.create("opus", "r")
        self.decoder.sample_rate = RATE
        self.decoder.layout = "mono"
        self.offset: int | None = None
        self.last_timestamp = 0
        self.unwrapped = 0

    def position(self, timestamp: int, arrival_sample: int) -> int:
        """The timeline sample of an RTP timestamp (unwrapping 32-bit wrap-arounds)."""
        if self.offset is None:
            self.unwrapped = timestamp
        else:
            self.unwrapped += (timestamp - self.last_timestamp + (1 << 31)) % (1 << 32) - (1 << 31)
        self.last_timestamp = timestamp
        position = self.unwrapped + (self.offset or 0)
        if self.offset is None or abs(position - arrival_sample) > _RESYNC_S * RATE:
            # A new speaker, or one whose clock jumped (a new stream): anchor on arrival.
            self.offset = arrival_sample - self.unwrapped
            position = arrival_sample
        return position


class SpaceRecorder:
    """Mixes a Space's forwarded speakers into an Ogg/Opus file on a worker thread.

    :param path: the file to write (its folder is created).
    :param bitrate: the mix's Opus bit rate.
    """

    def __init__(self, path: Path, *, bitrate: int = 48_000) -> None:
        self.path = path
        self._bitrate = bitrate
        self._packets: collections.deque[tuple[str, int, bytes, float]] = collections.deque()
        self._start = time.perf_counter()
        self._speakers: dict[str, _Speaker] = {}
        self._mix: dict[int, np.ndarray] = {}
        self._next_frame = 0
        self._stopping = threading.Event()
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._container: av.container.OutputContainer | None = None
        self._stream: av.audio.stream.AudioStream | None = None

    def start(self) -> None:
        """Open the file and start the worker."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(str(self.path), mode="w", format="ogg")
        stream = container.add_stream("libopus", rate=RATE)
        stream.layout = "mono"
        stream.bit_rate = self._bitrate
        self._container, self._stream = container, stream
        self._start = time.perf_counter()
        self._thread.start()

    def push(self, participant: str, timestamp: int, payload: bytes, received: float) -> None:
        """Take one forwarded packet's Opus payload (called on the event loop)."""
        self._packets.append((participant, timestamp, payload, received))

    def stop(self) -> RecordingResult:
        """Write what is left and close the file (blocks: call it off the event loop)."""
        self._stopping.set()
        self._thread.join()
        size = self.path.stat().st_size if self.path.exists() else 0
        return RecordingResult(self.path, self._next_frame * FRAME / RATE, size, self._failed)

    # -- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.wait(_TICK_S):
                self._decode_queued()
                horizon = int((time.perf_counter() - self._start - _LAG_S) * RATE) // FRAME
                self._write_until(horizon)
            self._decode_queued()
            last = max(self._mix, default=self._next_frame - 1)
            self._write_until(last + 1)
            self._finish()
        except Exception:
            logger.exception("recording %s failed", self.path)
            self._failed = True
            self._close_quietly()

    def _decode_queued(self) -> None:
        while self._packets:
            participant, timestamp, payload, received = self._packets.popleft()
            speaker = self._speakers.get(participant)
            if speaker is None:
                speaker = self._speakers[participant] = _Speaker()
            arrival = int((received - self._start) * RATE)
            position = speaker.position(timestamp, arrival)
            try:
                frames = speaker.decoder.decode(av.Packet(payload))
            except av.error.FFmpegError:
                continue  # a corrupt packet is one lost frame, not a lost recording
            for frame in frames:
                pcm = frame.to_ndarray().reshape(-1).astype(np.float32)
                self._add(position, pcm)
                position += len(pcm)

    def _add(self, position: int, pcm: np.ndarray) -> None:
        """Mix ``pcm`` into the frames it covers (frames already written are skipped)."""
        while len(pcm):
            index, offset = divmod(position, FRAME)
            take = min(FRAME - offset, len(pcm))
            if index >= self._next_frame:
                frame = self._mix.get(index)
                if frame is None:
                    frame = self._mix[index] = np.zeros(FRAME, dtype=np.float32)
                frame[offset : offset + take] += pcm[:take]
            pcm = pcm[take:]
            position += take

    def _write_until(self, end_frame: int) -> None:
        assert self._container is not None and self._stream is not None
        while self._next_frame < end_frame:
            mixed = self._mix.pop(self._next_frame, None)
            if mixed is None:
                mixed = np.zeros(FRAME, dtype=np.float32)
            samples = (np.clip(mixed, -1.0, 1.0) * 32767).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = RATE
            frame.pts = self._next_frame * FRAME
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self._next_frame += 1

    def _finish(self) -> None:
        assert self._container is not None and self._stream is not None
        if self._next_frame == 0:
            # No frame at all: FFmpeg would leave no file (its Ogg muxer writes the header
            # with the first packet), and a header-only file does not open in players.
            self._close_quietly()
            self.path.write_bytes(empty_ogg_opus(channels=1, input_rate=RATE))
            return
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def _close_quietly(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - already failing; keep the first error
                logger.debug("closing a failed recording", exc_info=True)
            self._container = None
