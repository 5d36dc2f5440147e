"""A recording that got no audio is still a valid, playable Ogg/Opus file of 0 s.

The pages are checked field by field against RFC 3533 (capture pattern, version, flags,
sequence numbers, CRC computed here bit by bit, independently of the writer's table) and
RFC 7845 (``OpusHead``, ``OpusTags``, end trimming); then FFmpeg (PyAV) opens and decodes
it: FFmpeg's Ogg demuxer is the one Chromium plays recordings with.
"""

from __future__ import annotations

import io
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from services.media.ogg import OPUS_SILENCE, empty_ogg_opus
from services.media.recording import SpaceRecorder


@dataclass(frozen=True)
class Page:
    flags: int
    granule: int
    serial: int
    sequence: int
    packets: list[bytes]


def bitwise_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def parse_pages(data: bytes) -> list[Page]:
    """Split an Ogg stream into pages, checking each page's framing and checksum.

    A packet continued on the next page is listed on the page where it ends.
    """
    pages, at, current = [], 0, b""
    while at < len(data):
        assert data[at : at + 4] == b"OggS", f"capture pattern at byte {at}"
        version, flags, granule, serial, sequence, crc, count = struct.unpack(
            "<BBqIIIB", data[at + 4 : at + 27]
        )
        assert version == 0
        lacing = data[at + 27 : at + 27 + count]
        end = at + 27 + count + sum(lacing)
        assert end <= len(data), "the page's body is whole"
        blank = data[at : at + 22] + b"\0\0\0\0" + data[at + 26 : end]
        assert bitwise_crc(blank) == crc, f"page {sequence}'s CRC"
        packets, body = [], at + 27 + count
        for value in lacing:
            current += data[body : body + value]
            body += value
            if value < 255:
                packets.append(current)
                current = b""
        pages.append(Page(flags, granule, serial, sequence, packets))
        at = end
    assert current == b"", "the last packet ends"
    return pages


def test_an_empty_recording_is_ogg_opus_headers_and_one_end_trimmed_packet() -> None:
    pages = parse_pages(empty_ogg_opus(channels=1, input_rate=48_000, serial=7))

    assert [page.sequence for page in pages] == [0, 1, 2]
    assert {page.serial for page in pages} == {7}
    assert [page.flags for page in pages] == [0x02, 0x00, 0x04], "BOS first, EOS last"
    (head,), (tags,), (audio,) = (page.packets for page in pages)
    magic, version, channels, pre_skip, rate, gain, mapping = struct.unpack("<8sBBHIhB", head)
    assert (magic, version, channels, rate, gain, mapping) == (b"OpusHead", 1, 1, 48000, 0, 0)
    assert pages[0].granule == pages[1].granule == 0, "header pages carry no samples"
    assert tags.startswith(b"OpusTags")
    (vendor_length,) = struct.unpack("<I", tags[8:12])
    assert struct.unpack("<I", tags[12 + vendor_length :]) == (0,), "no comments"
    assert audio == OPUS_SILENCE
    # One 20 ms packet (960 samples) but a granule of just the pre-skip: 0 samples play.
    assert pages[2].granule == pre_skip


def test_an_empty_recording_opens_and_decodes_to_no_audio() -> None:
    with av.open(io.BytesIO(empty_ogg_opus()), mode="r") as played:
        stream = played.streams.audio[0]
        assert stream.codec_context.name == "opus"
        assert stream.sample_rate == 48000 and stream.codec_context.layout.nb_channels == 1
        samples = sum(frame.samples for frame in played.decode(stream))
    assert samples == 0


def test_a_recorder_stopped_before_any_audio_leaves_a_playable_file(tmp_path: Path) -> None:
    recorder = SpaceRecorder(tmp_path / "space" / "r1.ogg")
    recorder.start()
    result = recorder.stop()

    assert not result.failed
    assert result.duration_s == 0
    assert result.path.exists() and result.size_bytes == result.path.stat().st_size > 0
    parse_pages(result.path.read_bytes())
    with av.open(str(result.path), mode="r") as played:
        assert sum(frame.samples for frame in played.decode(audio=0)) == 0


def test_a_recorder_that_got_audio_still_writes_it(tmp_path: Path) -> None:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "mono", "s16"
    tone = (np.sin(np.arange(960 * 10) * 2 * np.pi * 440 / 48000) * 8000).astype(np.int16)
    payloads = []
    for index in range(10):
        frame = av.AudioFrame.from_ndarray(
            tone[index * 960 : (index + 1) * 960].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = 48000, index * 960
        payloads += [bytes(packet) for packet in encoder.encode(frame)]
    recorder = SpaceRecorder(tmp_path / "r2.ogg")
    recorder.start()
    started = time.perf_counter()
    for index, payload in enumerate(payloads):
        recorder.push("alice", index * 960, payload, started + index * 0.02)
    result = recorder.stop()

    assert not result.failed and result.duration_s >= 0.15
    pages = parse_pages(result.path.read_bytes())
    assert len(pages) >= 3 and pages[-1].flags & 0x04
    with av.open(str(result.path), mode="r") as played:
        assert sum(frame.samples for frame in played.decode(audio=0)) > 0
