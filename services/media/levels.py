"""Speaking levels from the RFC 6464 audio-level header extension.

Each publisher's packets carry the level of the audio they hold (0 = 0 dBov, the
loudest, to 127 = -127 dBov, silence). A :class:`LevelMeter` smooths them into a
*loudness* (127 minus the level, so louder is larger) that slot selection ranks by and
that the service publishes to rooms a few times a second as :class:`SpeakerLevel`.
"""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)

__all__ = ["SPEAKING_THRESHOLD_DBOV", "LevelMeter", "SpeakerLevel"]

SPEAKING_THRESHOLD_DBOV = -50.0
"""A publisher louder than this (smoothed) counts as speaking."""

_ALPHA = 0.12
"""Smoothing per packet: with 20 ms packets, a time constant of about 160 ms."""


@dataclasses.dataclass(frozen=True)
class SpeakerLevel:
    """One publisher's level at a moment, as published to rooms.

    :param participant: the participant's id.
    :param level: linear level from 0.0 (silence) to 1.0 (full scale), as WebRTC's
        ``audioLevel``.
    :param dbov: the smoothed level in dBov (-127 to 0).
    :param speaking: whether the smoothed level is above :data:`SPEAKING_THRESHOLD_DBOV`.
    :param forwarded: whether the publisher currently holds a listening slot.
    """

    participant: str
    level: float
    dbov: float
    speaking: bool
    forwarded: bool


class LevelMeter:
    """Smoothed loudness of one publisher.

    :param now: when the meter starts (``time.monotonic()`` seconds).
    """

    __slots__ = ("last_packet", "loudness")

    def __init__(self, now: float = 0.0) -> None:
        self.loudness = 0.0
        self.last_packet = now

    def add(self, level: int, now: float) -> None:
        """Account one packet's RFC 6464 level (0 loudest .. 127 silence)."""
        self.loudness += ((127 - level) - self.loudness) * _ALPHA
        self.last_packet = now

    @property
    def dbov(self) -> float:
        """The smoothed level in dBov."""
        return self.loudness - 127.0

    def active(self, now: float, timeout: float) -> bool:
        """Whether a packet arrived within the last ``timeout`` seconds."""
        return now - self.last_packet <= timeout

    def snapshot(self, participant: str, forwarded: bool) -> SpeakerLevel:
        """The meter as a :class:`SpeakerLevel`."""
        dbov = self.dbov
        return SpeakerLevel(
            participant=participant,
            level=round(10.0 ** (dbov / 20.0), 4) if dbov > -127.0 else 0.0,
            dbov=round(dbov, 1),
            speaking=dbov > SPEAKING_THRESHOLD_DBOV,
            forwarded=forwarded,
        )
