"""RTP parsing for the forwarding path (RFC 3550 headers, RFC 8285 extensions, RFC 6464)."""

from __future__ import annotations

import struct

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from hypothesis import given
from hypothesis import strategies as st

from services.media.rtp import SILENCE_LEVEL, build_header, is_rtcp, parse_rtp, seq_newer

LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"


def aiortc_packet(level: int | None, mid: str | None, payload: bytes, csrc: int = 0) -> bytes:
    """A packet as aiortc (and browsers) write it: one-byte extensions."""
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=4, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
                RTCRtpHeaderExtensionParameters(id=1, uri=LEVEL_URI),
            ]
        )
    )
    packet = RtpPacket(payload_type=111, marker=1, sequence_number=4321, timestamp=96000, ssrc=77)
    packet.csrc = list(range(1, csrc + 1))
    packet.payload = payload
    packet.extensions.mid = mid
    if level is not None:
        packet.extensions.audio_level = (True, level)
    return packet.serialize(extensions)


@pytest.mark.parametrize("csrc", [0, 2])
def test_parse_a_packet_with_level_and_mid(csrc: int) -> None:
    data = aiortc_packet(level=42, mid="0", payload=b"opus-frame", csrc=csrc)
    pt, marker, seq, ts, ssrc, start, end, level = parse_rtp(data, level_id=1)
    assert (pt, marker, seq, ts, ssrc, level) == (111, 1, 4321, 96000, 77, 42)
    assert data[start:end] == b"opus-frame"


def test_the_level_defaults_to_silence() -> None:
    assert parse_rtp(aiortc_packet(None, "0", b"x"), level_id=1)[-1] == SILENCE_LEVEL
    assert parse_rtp(aiortc_packet(10, "0", b"x"), level_id=None)[-1] == SILENCE_LEVEL
    assert parse_rtp(build_header(0, 111, 1, 2, 3) + b"x", level_id=1)[-1] == SILENCE_LEVEL


def test_two_byte_extensions_and_padding() -> None:
    # Two-byte header extensions (0x100x profile): id 1 (level, 1 byte), id 9 (3 bytes).
    elements = bytes([1, 1, 0x80 | 17, 9, 3, 1, 2, 3])
    block = struct.pack("!HH", 0x1000, 2) + elements
    payload = b"abcd"
    padding = b"\x00\x00\x03"
    header = bytearray(build_header(0, 111, 5, 6, 7))
    header[0] |= 0x10 | 0x20  # extension and padding
    data = bytes(header) + block + payload + padding
    _, _, _, _, _, start, end, level = parse_rtp(data, level_id=1)
    assert level == 17
    assert data[start:end] == payload


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x6f\x00",
        b"\x40" + b"\x00" * 15,
        bytes([0x90]) + b"\x00" * 11 + b"\xbe\xde\x00\x05",
        bytes([0xA0]) + b"\x00" * 11 + b"\x40",
    ],
)
def test_malformed_packets_raise(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_rtp(data, level_id=1)


@given(
    marker=st.integers(0, 1),
    pt=st.integers(0, 127),
    seq=st.integers(0, 0xFFFF),
    ts=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=64),
)
def test_build_header_round_trips(
    marker: int, pt: int, seq: int, ts: int, ssrc: int, payload: bytes
) -> None:
    data = build_header(marker, pt, seq, ts, ssrc) + payload
    assert len(build_header(marker, pt, seq, ts, ssrc)) == 12
    parsed = RtpPacket.parse(data)
    assert (parsed.marker, parsed.payload_type, parsed.sequence_number) == (marker, pt, seq)
    assert (parsed.timestamp, parsed.ssrc, parsed.payload) == (ts, ssrc, payload)
    assert parse_rtp(data, None)[:5] == (pt, marker, seq, ts, ssrc)


def test_rtcp_demultiplexing_and_sequence_order() -> None:
    assert is_rtcp(b"\x80\xc8") and is_rtcp(b"\x81\xc9") and not is_rtcp(b"\x80\x6f")
    assert not is_rtcp(b"\x80")
    assert seq_newer(1, 0) and seq_newer(0, 0xFFFF) and not seq_newer(0, 1)
    assert not seq_newer(5, 5) and not seq_newer(0x8000, 0)
