"""SDP offers from apps: what they ask for, and the munging that keeps sessions Opus-only.

An app's offer carries one audio m-line it publishes on (``sendrecv`` or ``sendonly``) and
K ``recvonly`` audio m-lines, the listening slots. This module reads such an offer without
aiortc (so a bad offer is rejected before any peer connection exists), restricts every
audio m-line to Opus (RFC 7587) and finishes the answer's Opus parameters.

The parser is deliberately small: it understands the lines that decide the session's
shape (``m=``, ``a=mid``, directions, ``a=rtpmap``, ``a=extmap``, ``a=group:BUNDLE``) and
copies everything else through untouched. Once the shape is right, the offer is also read
with aiortc's SDP parser (no peer connection) and held to what aiortc would refuse later
(ICE credentials, a DTLS fingerprint, RTCP mux): :func:`parse_offer` runs before the media
grant is spent, so everything that can refuse an offer must refuse it there.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from aiortc import sdp as aiortc_sdp

from services.common.errors import InvalidArgument

logger = logging.getLogger(__name__)

__all__ = [
    "AUDIO_LEVEL_URI",
    "MID_URI",
    "AudioLine",
    "Offer",
    "parse_offer",
    "restrict_to_opus",
    "tune_answer",
]

AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
OPUS_FMTP = "minptime=10;useinbandfec=1"
"""Opus parameters media answers with: 10 ms minimum packets, in-band FEC welcome."""

_DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})
_RTPMAP = re.compile(r"^a=rtpmap:(\d+) ([^/\s]+)/(\d+)(?:/(\d+))?", re.IGNORECASE)
_EXTMAP = re.compile(r"^a=extmap:(\d+)(?:/\w+)? (\S+)")
_FMT_ATTR = re.compile(r"^a=(rtpmap|fmtp|rtcp-fb):(\d+|\*)[ \t]")
_MAX_OFFER_BYTES = 65536
_MAX_M_LINES = 64
"""An app needs 1 + ``max_slots`` (16) m-lines; AddIceCandidate's ``sdp_m_line_index`` goes
up to 63. aiortc does work per m-line (a 600-line offer takes ~0.3 s of the event loop and
a 600 KiB answer), so more lines than a candidate can name are refused."""


@dataclasses.dataclass(frozen=True)
class AudioLine:
    """One audio m-line of an offer.

    :param index: position among all m-lines (``sdpMLineIndex``).
    :param mid: the ``a=mid`` value.
    :param direction: the offerer's direction (``sendrecv`` when the line names none).
    :param opus_pt: the Opus payload type, or ``None`` when the line has no Opus.
    :param audio_level_id: the RFC 6464 header extension id, or ``None``.
    """

    index: int
    mid: str
    direction: str
    opus_pt: int | None
    audio_level_id: int | None

    @property
    def publishes(self) -> bool:
        """Whether the app sends on this line."""
        return self.direction in ("sendrecv", "sendonly")


@dataclasses.dataclass(frozen=True)
class Offer:
    """The shape of an app's offer.

    :param lines: the audio m-lines, in order.
    :param bundle: the mids of the offer's ``a=group:BUNDLE``, in order.
    """

    lines: tuple[AudioLine, ...]
    bundle: tuple[str, ...]

    @property
    def publish_line(self) -> AudioLine | None:
        """The first line the app sends on, or ``None`` for a listen-only offer."""
        return next((line for line in self.lines if line.publishes), None)

    def slot_lines(self, limit: int) -> tuple[AudioLine, ...]:
        """The ``recvonly`` lines used as listening slots, at most ``limit`` of them."""
        return tuple(line for line in self.lines if line.direction == "recvonly")[:limit]


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_SDP")


def _split(sdp: str) -> tuple[list[str], list[list[str]]]:
    """Split an SDP into its session lines and one list of lines per m-section."""
    session: list[str] = []
    sections: list[list[str]] = []
    for raw in sdp.replace("\r\n", "\n").split("\n"):
        line = raw.rstrip("\r")
        if not line:
            continue
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            session.append(line)
    return session, sections


def parse_offer(sdp: str) -> Offer:
    """Read the audio m-lines and the BUNDLE group of an offer.

    :raises InvalidArgument: (``INVALID_SDP``) when the offer is not an SDP, has a
        non-audio m-line, has no audio m-line, or does not bundle all of its m-lines.
    """
    if len(sdp.encode()) > _MAX_OFFER_BYTES:
        raise _invalid("the offer is larger than 64 KiB")
    if not sdp.startswith("v=0"):
        raise _invalid("the offer does not start with v=0")
    session, sections = _split(sdp)
    if len(sections) > _MAX_M_LINES:
        raise _invalid(f"the offer has {len(sections)} m-lines; at most {_MAX_M_LINES}")
    bundle: tuple[str, ...] = ()
    for line in session:
        if line.startswith("a=group:BUNDLE"):
            bundle = tuple(line.split()[1:])
    lines: list[AudioLine] = []
    for index, section in enumerate(sections):
        kind = section[0][2:].split(" ", 1)[0]
        if kind != "audio":
            raise _invalid(f"m-line {index} is {kind!r}; media only takes audio")
        mid: str | None = None
        direction = "sendrecv"
        rtpmap: dict[int, str] = {}
        level_id: int | None = None
        for line in section[1:]:
            if line.startswith("a=mid:"):
                mid = line[6:].strip()
            elif line[2:] in _DIRECTIONS and line.startswith("a="):
                direction = line[2:]
            elif match := _RTPMAP.match(line):
                rtpmap[int(match.group(1))] = f"{match.group(2).lower()}/{match.group(3)}"
            elif (match := _EXTMAP.match(line)) and match.group(2) == AUDIO_LEVEL_URI:
                level_id = int(match.group(1))
        if mid is None:
            raise _invalid(f"m-line {index} has no a=mid")
        opus_pt = next((pt for pt, name in rtpmap.items() if name == "opus/48000"), None)
        lines.append(AudioLine(index, mid, direction, opus_pt, level_id))
    if not lines:
        raise _invalid("the offer has no audio m-line")
    if len(lines) > 1 and set(bundle) != {line.mid for line in lines}:
        raise _invalid("the offer must BUNDLE all of its m-lines")
    if all(line.opus_pt is None for line in lines):
        raise _invalid("the offer has no Opus codec")
    _check_transport(sdp)
    return Offer(tuple(lines), bundle)


def _check_transport(sdp: str) -> None:
    """Refuse what aiortc's ``setRemoteDescription`` would refuse, or accept and never
    connect: an unparsable line, a section without ICE credentials, DTLS fingerprint or
    RTCP mux. Read as the peer will read it (restricted to Opus)."""
    try:
        description = aiortc_sdp.SessionDescription.parse(restrict_to_opus(sdp))
    except Exception as exc:  # aiortc's parser asserts, or int() raises, on bad fields
        logger.debug("aiortc cannot parse an offer: %r", exc)
        raise _invalid("the offer does not parse (a malformed m= or attribute line)") from None
    for index, media in enumerate(description.media):
        if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
            raise _invalid(f"m-line {index} has no ICE credentials (a=ice-ufrag, a=ice-pwd)")
        if media.dtls is None or not media.dtls.fingerprints:
            raise _invalid(f"m-line {index} has no DTLS fingerprint (a=fingerprint)")
        if not media.rtcp_mux:
            raise _invalid(f"m-line {index} does not multiplex RTCP (a=rtcp-mux)")


def restrict_to_opus(sdp: str) -> str:
    """Drop every codec but Opus from the offer's audio m-lines.

    aiortc answers with every codec the offer and aiortc share; an SFU that forwards
    without transcoding must speak one codec end to end, so the others go before aiortc
    sees the offer. Lines without Opus are left alone (the caller rejects or disables
    them).
    """
    session, sections = _split(sdp)
    out = list(session)
    for section in sections:
        rtpmap = {
            int(m.group(1)): f"{m.group(2).lower()}/{m.group(3)}"
            for line in section
            if (m := _RTPMAP.match(line))
        }
        keep = {pt for pt, name in rtpmap.items() if name == "opus/48000"}
        if not keep:
            out.extend(section)
            continue
        fields = section[0].split(" ")
        head = fields[:3]
        formats = [f for f in fields[3:] if f.isascii() and f.isdigit() and int(f) in keep]
        out.append(" ".join(head + formats))
        for line in section[1:]:
            match = _FMT_ATTR.match(line)
            if match and match.group(2) != "*" and int(match.group(2)) not in keep:
                continue
            out.append(line)
    return "\r\n".join(out) + "\r\n"


def tune_answer(sdp: str) -> str:
    """Add Media's Opus parameters (:data:`OPUS_FMTP`) to an answer that has none.

    aiortc writes no ``a=fmtp`` for Opus; without one a browser assumes neither FEC nor
    a 10 ms minimum packet time.
    """
    session, sections = _split(sdp)
    out = list(session)
    for section in sections:
        has_fmtp = {
            int(m.group(2))
            for line in section
            if (m := _FMT_ATTR.match(line)) and m.group(1) == "fmtp" and m.group(2) != "*"
        }
        for line in section:
            out.append(line)
            match = _RTPMAP.match(line)
            if match and match.group(2).lower() == "opus" and int(match.group(1)) not in has_fmtp:
                out.append(f"a=fmtp:{match.group(1)} {OPUS_FMTP}")
    return "\r\n".join(out) + "\r\n"
