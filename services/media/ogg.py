"""Ogg pages (RFC 3533) written by hand, for the one file FFmpeg's muxer cannot make.

A recorded Space that ended before half a second of it was written (before anyone spoke,
or before the recorder's lag let the first frame out) has no audio frame to mux. FFmpeg's
Ogg muxer then writes nothing at all, or, with its header forced out, the two header pages
alone; but a stream with no audio packet is not playable: FFmpeg's demuxer (Chromium's too)
waits for the first audio packet to finish reading the headers and fails to open it.

:func:`empty_ogg_opus` writes what the reference encoder (``opusenc``) writes for empty
input: the ``OpusHead`` and ``OpusTags`` pages and one last page holding a single 20 ms
silent packet whose granule position equals the pre-skip, so it plays zero samples
(RFC 7845 §4.5, end trimming). Players open it and play it for 0 s.
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import Sequence

logger = logging.getLogger(__name__)

__all__ = ["OPUS_SILENCE", "empty_ogg_opus", "ogg_crc", "ogg_page"]

_CAPTURE = b"OggS"
_BOS = 0x02
_EOS = 0x04
_PRE_SKIP = 312
"""libopus's look-ahead at 48 kHz: what the recordings' encoder writes in ``OpusHead``."""
OPUS_SILENCE = b"\xf8\xff\xfe"
"""One 20 ms mono CELT frame of silence (TOC config 31, one frame), as libopus emits it."""


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        value = byte << 24
        for _ in range(8):
            value = (value << 1) ^ 0x04C11DB7 if value & 0x80000000 else value << 1
        table.append(value & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def ogg_crc(data: bytes) -> int:
    """Ogg's page checksum: CRC-32, polynomial 0x04C11DB7, not reflected, initial 0."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[(crc >> 24) ^ byte]
    return crc


def ogg_page(
    packets: Sequence[bytes],
    *,
    serial: int,
    sequence: int,
    granule: int,
    bos: bool = False,
    eos: bool = False,
) -> bytes:
    """One Ogg page holding whole ``packets`` (at most 255 lacing values in all)."""
    lacing = bytearray()
    for packet in packets:
        lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    if len(lacing) > 255:
        raise ValueError("the packets do not fit on one Ogg page")
    flags = (_BOS if bos else 0) | (_EOS if eos else 0)
    header = _CAPTURE + struct.pack("<BBqIIIB", 0, flags, granule, serial, sequence, 0, len(lacing))
    page = bytearray(header + lacing + b"".join(packets))
    page[22:26] = struct.pack("<I", ogg_crc(bytes(page)))
    return bytes(page)


def empty_ogg_opus(
    *,
    channels: int = 1,
    input_rate: int = 48_000,
    vendor: str = "spaces recorder",
    serial: int | None = None,
) -> bytes:
    """A valid Ogg/Opus file that plays for 0 s (headers and one end-trimmed packet).

    :param channels: the ``OpusHead`` channel count (1 or 2, mapping family 0).
    :param input_rate: the ``OpusHead`` original sample rate (informational).
    :param vendor: the ``OpusTags`` vendor string.
    :param serial: the stream's serial number (random when ``None``, as RFC 3533 asks).
    """
    if serial is None:
        serial = random.getrandbits(32)
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, channels, _PRE_SKIP, input_rate, 0, 0)
    encoded_vendor = vendor.encode()
    tags = b"OpusTags" + struct.pack("<I", len(encoded_vendor)) + encoded_vendor
    tags += struct.pack("<I", 0)  # no user comments
    # Granule positions count 48 kHz samples including the pre-skip: a last page at
    # exactly the pre-skip trims the one packet's 960 samples down to none.
    return b"".join(
        (
            ogg_page([head], serial=serial, sequence=0, granule=0, bos=True),
            ogg_page([tags], serial=serial, sequence=1, granule=0),
            ogg_page([OPUS_SILENCE], serial=serial, sequence=2, granule=_PRE_SKIP, eos=True),
        )
    )
