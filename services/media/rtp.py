"""RTP packet parsing and header building for the forwarding path (RFC 3550, RFC 6464).

Everything here works on ``bytes`` and plain ints so that the per-packet path allocates
nothing but the packet it forwards: :func:`parse_rtp` returns a tuple, not an object.
"""

from __future__ import annotations

import logging
import struct

logger = logging.getLogger(__name__)

__all__ = [
    "RTP_HEADER",
    "SILENCE_LEVEL",
    "build_header",
    "is_rtcp",
    "parse_rtp",
    "seq_newer",
]

RTP_HEADER = struct.Struct("!BBHII")
"""V/P/X/CC, M/PT, sequence number, timestamp, SSRC: the fixed 12 bytes."""

SILENCE_LEVEL = 127
"""RFC 6464 level of digital silence (-127 dBov); also used when a packet carries none."""

_ONE_BYTE_PROFILE = 0xBEDE
_TWO_BYTE_MASK = 0xFFF0
_TWO_BYTE_PROFILE = 0x1000


def is_rtcp(data: bytes) -> bool:
    """Whether a (possibly SRTP-protected) packet is RTCP (RFC 5761 demultiplexing)."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def seq_newer(a: int, b: int) -> bool:
    """Whether 16-bit sequence number ``a`` comes after ``b`` (modulo wrap-around)."""
    return a != b and ((a - b) & 0xFFFF) < 0x8000


def _audio_level(data: bytes, start: int, end: int, profile: int, level_id: int) -> int:
    """Find the RFC 6464 level in a header extension block; :data:`SILENCE_LEVEL` if none."""
    i = start
    if profile == _ONE_BYTE_PROFILE:
        while i < end:
            b = data[i]
            if b == 0:  # padding
                i += 1
                continue
            ext_id = b >> 4
            length = (b & 0x0F) + 1
            if ext_id == 15:
                break
            if ext_id == level_id and i + 1 < end:
                return data[i + 1] & 0x7F
            i += 1 + length
    elif (profile & _TWO_BYTE_MASK) == _TWO_BYTE_PROFILE:
        while i + 1 < end:
            ext_id = data[i]
            if ext_id == 0:
                i += 1
                continue
            length = data[i + 1]
            if ext_id == level_id and length >= 1 and i + 2 < end:
                return data[i + 2] & 0x7F
            i += 2 + length
    return SILENCE_LEVEL


def parse_rtp(data: bytes, level_id: int | None) -> tuple[int, int, int, int, int, int, int, int]:
    """Parse the parts of an RTP packet the forwarder needs.

    :param level_id: the negotiated RFC 6464 extension id, or ``None``.
    :returns: ``(payload_type, marker, sequence, timestamp, ssrc, payload_start,
        payload_end, level)`` where level is 0 (loudest) to 127 (silence).
    :raises ValueError: on a truncated or non-version-2 packet.
    """
    size = len(data)
    if size < 12:
        raise ValueError("RTP packet shorter than its header")
    b0, b1, seq, ts, ssrc = RTP_HEADER.unpack_from(data)
    if b0 >> 6 != 2:
        raise ValueError("not RTP version 2")
    start = 12 + 4 * (b0 & 0x0F)
    level = SILENCE_LEVEL
    if b0 & 0x10:
        if start + 4 > size:
            raise ValueError("truncated RTP header extension")
        profile, words = struct.unpack_from("!HH", data, start)
        ext_end = start + 4 + 4 * words
        if ext_end > size:
            raise ValueError("truncated RTP header extension")
        if level_id is not None:
            level = _audio_level(data, start + 4, ext_end, profile, level_id)
        start = ext_end
    end = size
    if b0 & 0x20:
        end -= data[-1]
    if end < start:
        raise ValueError("RTP padding longer than the payload")
    return b1 & 0x7F, b1 >> 7, seq, ts, ssrc, start, end, level


def build_header(marker: int, payload_type: int, seq: int, timestamp: int, ssrc: int) -> bytes:
    """A 12-byte RTP header without CSRCs or extensions."""
    return RTP_HEADER.pack(0x80, (marker << 7) | payload_type, seq, timestamp, ssrc)
