"""Reading app offers and keeping sessions Opus-only."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.media.peer import Layout
from services.media.sdp import (
    AUDIO_LEVEL_URI,
    OPUS_FMTP,
    parse_offer,
    restrict_to_opus,
    tune_answer,
)


def audio_section(mid: str, direction: str, level_id: int = 1) -> str:
    return "\r\n".join(
        [
            "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 126",
            "c=IN IP4 0.0.0.0",
            "a=rtcp:9 IN IP4 0.0.0.0",
            "a=ice-ufrag:abcd",
            "a=ice-pwd:abcdefghijklmnopqrstuvwx",
            "a=fingerprint:sha-256 00:11",
            "a=setup:actpass",
            f"a=mid:{mid}",
            f"a=extmap:{level_id} {AUDIO_LEVEL_URI}",
            "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
            f"a={direction}",
            "a=rtcp-mux",
            "a=rtpmap:111 opus/48000/2",
            "a=rtcp-fb:111 transport-cc",
            "a=fmtp:111 minptime=10;useinbandfec=1",
            "a=rtpmap:63 red/48000/2",
            "a=fmtp:63 111/111",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:126 telephone-event/8000",
        ]
    )


def chrome_offer(
    directions: tuple[str, ...] = ("sendrecv", "recvonly", "recvonly", "recvonly"),
) -> str:
    mids = [str(i) for i in range(len(directions))]
    head = [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        f"a=group:BUNDLE {' '.join(mids)}",
        "a=msid-semantic: WMS",
    ]
    sections = [audio_section(mid, d) for mid, d in zip(mids, directions, strict=True)]
    return "\r\n".join([*head, *sections]) + "\r\n"


def test_a_browser_offer_is_read() -> None:
    offer = parse_offer(chrome_offer())
    assert [line.mid for line in offer.lines] == ["0", "1", "2", "3"]
    assert offer.bundle == ("0", "1", "2", "3")
    publish = offer.publish_line
    assert publish is not None and publish.mid == "0" and publish.publishes
    assert publish.opus_pt == 111 and publish.audio_level_id == 1
    assert [line.mid for line in offer.slot_lines(2)] == ["1", "2"]
    layout = Layout.of(offer, slot_count=3)
    assert layout.publish == publish
    assert [s.mid for s in layout.slots] == ["1", "2", "3"]
    assert layout.slot_payload_type == 111


def test_a_listen_only_offer_has_no_publish_line() -> None:
    offer = parse_offer(chrome_offer(("recvonly", "recvonly")))
    assert offer.publish_line is None
    assert Layout.of(offer, 3).publish is None


@pytest.mark.parametrize(
    ("sdp", "message"),
    [
        ("hello", "v=0"),
        (chrome_offer().replace("m=audio", "m=video", 1), "video"),
        (chrome_offer().replace("a=mid:1\r\n", ""), "mid"),
        (chrome_offer().replace("a=group:BUNDLE 0 1 2 3", "a=group:BUNDLE 0 1"), "BUNDLE"),
        (chrome_offer().replace("opus/48000/2", "speex/48000"), "Opus"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "no audio"),
        ("v=0\r\n" + "a=x\r\n" * 20000, "64 KiB"),
        (chrome_offer(("recvonly",) * 65), "at most 64"),
        (chrome_offer().replace("a=ice-ufrag:abcd\r\n", ""), "ICE credentials"),
        (chrome_offer().replace("a=fingerprint:sha-256 00:11\r\n", ""), "fingerprint"),
        (chrome_offer().replace("a=rtcp-mux\r\n", ""), "rtcp-mux"),
        (chrome_offer().replace("m=audio 9 ", "m=audio nine ", 1), "does not parse"),
    ],
)
def test_unusable_offers_are_invalid_sdp(sdp: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_offer(sdp)
    assert error.value.reason == "INVALID_SDP"
    assert message in error.value.message


def test_slot_lines_must_agree_on_the_opus_payload_type() -> None:
    sdp = chrome_offer()
    parts = sdp.split("m=audio")
    parts[2] = parts[2].replace("111", "109")
    with pytest.raises(InvalidArgument):
        Layout.of(parse_offer("m=audio".join(parts)), 3)


def test_restrict_to_opus_keeps_only_opus() -> None:
    munged = restrict_to_opus(chrome_offer(("sendonly",)))
    lines = munged.split("\r\n")
    assert "m=audio 9 UDP/TLS/RTP/SAVPF 111" in lines
    assert "a=rtpmap:111 opus/48000/2" in lines
    assert "a=fmtp:111 minptime=10;useinbandfec=1" in lines
    assert "a=rtcp-fb:111 transport-cc" in lines
    for gone in ("red/48000", "G722", "PCMU", "PCMA", "telephone-event", "a=fmtp:63"):
        assert gone not in munged
    assert f"a=extmap:1 {AUDIO_LEVEL_URI}" in lines, "other lines are kept"
    assert munged.endswith("\r\n")
    assert parse_offer(munged).lines[0].opus_pt == 111


def test_lines_without_opus_are_left_alone() -> None:
    sdp = chrome_offer(("sendonly", "recvonly"))
    sections = sdp.split("m=audio")
    sections[2] = sections[2].replace("a=rtpmap:111 opus/48000/2", "a=rtpmap:111 foo/8000")
    munged = restrict_to_opus("m=audio".join(sections))
    assert munged.count("a=rtpmap:0 PCMU/8000") == 1


def test_tune_answer_adds_opus_parameters_once() -> None:
    answer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 opus/48000/2\r\n"
    tuned = tune_answer(answer)
    assert f"a=rtpmap:96 opus/48000/2\r\na=fmtp:96 {OPUS_FMTP}\r\n" in tuned
    assert tune_answer(tuned).count("a=fmtp:96") == 1


def test_a_format_that_only_looks_like_a_number_is_dropped_not_a_crash() -> None:
    offer = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 \u00b2\r\na=mid:0\r\na=rtpmap:111 opus/48000/2\r\n"
    )
    munged = restrict_to_opus(offer)
    assert "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" in munged
