"""Live captions: the one place media decodes speech, to recognize it.

A :class:`CaptionWorker` runs for a Space on its origin node when captions are enabled on
the node. Like the recorder it receives the Opus payload of every forwarded packet (the N
loudest speakers); on its own thread it decodes each speaker, resamples to 16 kHz and feeds
an offline recognizer (pocketsphinx and the English model in its wheel). An utterance
starts when a speaker's audio rises above a threshold and ends after a pause or a maximum
length; while it lasts, non-final segments (the current hypothesis) go out about once a
second, then one final segment with the same id.

Recognition may be slower than real time on a busy machine: each speaker's backlog is
bounded, and audio beyond it is dropped (captions lag less, and forwarding never waits).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import av
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CaptionSegmentData", "CaptionWorker"]

_TICK_S = 0.1
_RATE = 16_000
_VOICE_RMS = 300.0
"""16-bit RMS above which a chunk counts as speech."""


@dataclasses.dataclass(frozen=True)
class CaptionSegmentData:
    """One caption segment for rooms.

    :param segment_id: stable id; non-final segments are replaced by later ones.
    :param participant: who spoke.
    :param text: what was recognized.
    :param start_offset_s: start, in seconds since the Space opened.
    :param end_offset_s: end, in seconds since the Space opened.
    :param final: whether the text will not change any more.
    """

    segment_id: str
    participant: str
    text: str
    start_offset_s: float
    end_offset_s: float
    final: bool


PostSegment = Callable[[CaptionSegmentData], Coroutine[Any, Any, None]]


class _SpeakerStream:
    """One speaker's decoder, resampler, recognizer and utterance state."""

    def __init__(self, participant: str, model_config: dict[str, object]) -> None:
        from pocketsphinx import Decoder

        self.participant = participant
        self.opus = av.CodecContext.create("opus", "r")
        self.opus.sample_rate = 48_000
        self.opus.layout = "mono"
        self.resampler = av.AudioResampler(format="s16", layout="mono", rate=_RATE)
        self.recognizer = Decoder(**model_config)
        self.in_utterance = False
        self.utterance_start = 0.0
        self.last_voice = 0.0
        self.last_partial = 0.0
        self.last_text = ""
        self.count = 0

    def pcm(self, payload: bytes) -> bytes:
        """Decode and resample one Opus packet to 16 kHz 16-bit mono."""
        out = bytearray()
        for frame in self.opus.decode(av.Packet(payload)):
            for resampled in self.resampler.resample(frame):
                out += bytes(resampled.planes[0])[: resampled.samples * 2]
        return bytes(out)


class CaptionWorker:
    """Captions one Space on a worker thread.

    :param space: the Space's id.
    :param post: coroutine function sending a segment to rooms (run on ``loop``).
    :param loop: the event loop ``post`` runs on.
    :param origin_time: when the Space opened (Unix seconds); offsets count from it.
    :param silence_s: a pause this long ends an utterance.
    :param max_utterance_s: an utterance longer than this is cut.
    :param partial_every_s: seconds between non-final segments.
    :param max_backlog_s: audio per speaker waiting for recognition beyond which the
        oldest is dropped.
    """

    def __init__(
        self,
        space: str,
        post: PostSegment,
        loop: asyncio.AbstractEventLoop,
        *,
        origin_time: float,
        silence_s: float = 0.8,
        max_utterance_s: float = 15.0,
        partial_every_s: float = 1.0,
        max_backlog_s: float = 5.0,
    ) -> None:
        self.space = space
        self._post = post
        self._loop = loop
        self._origin = origin_time
        self._silence_s = silence_s
        self._max_utterance_s = max_utterance_s
        self._partial_every_s = partial_every_s
        self._max_backlog = int(max_backlog_s * 50)  # 20 ms packets
        self._packets: collections.deque[tuple[str, bytes, float]] = collections.deque()
        self._speakers: dict[str, _SpeakerStream] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="captions", daemon=True)
        self._model_config: dict[str, object] = {"samprate": _RATE, "loglevel": "FATAL"}

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def push(self, participant: str, timestamp: int, payload: bytes, received: float) -> None:
        """Take one forwarded packet (called on the event loop)."""
        self._packets.append((participant, payload, time.time()))
        if len(self._packets) > self._max_backlog * 3:
            self._packets.popleft()

    def stop(self) -> None:
        """Finish open utterances and stop (blocks: call it off the event loop)."""
        self._stopping.set()
        self._thread.join()

    # -- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.wait(_TICK_S):
                self._recognize_queued()
                self._close_paused(time.time())
            self._recognize_queued()
            for stream in self._speakers.values():
                if stream.in_utterance:
                    self._end(stream, time.time())
        except Exception:
            logger.exception("captions of space %s failed", self.space)

    def _recognize_queued(self) -> None:
        while self._packets:
            participant, payload, arrived = self._packets.popleft()
            stream = self._speakers.get(participant)
            if stream is None:
                stream = self._speakers[participant] = _SpeakerStream(
                    participant, self._model_config
                )
            try:
                pcm = stream.pcm(payload)
            except av.error.FFmpegError:
                continue
            if not pcm:
                continue
            samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
            voiced = float(np.sqrt(np.mean(samples * samples))) > _VOICE_RMS
            if voiced:
                stream.last_voice = arrived
                if not stream.in_utterance:
                    stream.in_utterance = True
                    stream.utterance_start = arrived
                    stream.last_partial = arrived
                    stream.last_text = ""
                    stream.count += 1
                    stream.recognizer.start_utt()
            if not stream.in_utterance:
                continue
            stream.recognizer.process_raw(pcm, False, False)
            if arrived - stream.utterance_start > self._max_utterance_s:
                self._end(stream, arrived)
            elif arrived - stream.last_partial >= self._partial_every_s:
                stream.last_partial = arrived
                self._send(stream, arrived, final=False)

    def _close_paused(self, now: float) -> None:
        for stream in self._speakers.values():
            if stream.in_utterance and now - stream.last_voice > self._silence_s:
                self._end(stream, stream.last_voice)

    def _end(self, stream: _SpeakerStream, when: float) -> None:
        stream.recognizer.end_utt()
        stream.in_utterance = False
        self._send(stream, when, final=True)

    def _send(self, stream: _SpeakerStream, when: float, *, final: bool) -> None:
        hypothesis = stream.recognizer.hyp()
        text = hypothesis.hypstr.strip() if hypothesis is not None else ""
        if not text or (not final and text == stream.last_text):
            return
        stream.last_text = text
        segment = CaptionSegmentData(
            segment_id=f"{stream.participant[:40]}-{stream.count}",
            participant=stream.participant,
            text=text[:1000],
            start_offset_s=max(0.0, stream.utterance_start - self._origin),
            end_offset_s=max(0.0, when - self._origin),
            final=final,
        )
        future = asyncio.run_coroutine_threadsafe(self._post(segment), self._loop)
        future.add_done_callback(_log_post_failure)


def _log_post_failure(future: concurrent.futures.Future[None]) -> None:
    error = future.exception()
    if error is not None:
        logger.warning("a caption segment was not posted: %s", error)
