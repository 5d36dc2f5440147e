"""The fast path's own SRTP AES-GCM against the references: raw AES-GCM against OpenSSL
(through ``cryptography``) and the published test vectors, and SRTP packets against
libsrtp (pylibsrtp) byte for byte: both key sizes, header extensions and CSRCs, several
SSRCs, rollover, reordering; and what it must refuse (repeated indices, bad packets)."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pylibsrtp import Policy, Session

from services.media.rtp import build_header
from services.media.srtp_native import (
    GcmSender,
    SrtpKeyError,
    aes_gcm_encrypt,
    gcm_available,
)

pytestmark = pytest.mark.skipif(
    not gcm_available(), reason="needs the native module (make) and an AES-NI CPU"
)

PROFILES = {
    16: Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    32: Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}


def test_the_gcm_specification_s_test_vectors() -> None:
    """Test cases 1 and 2 of McGrew and Viega's GCM specification (zero key and IV)."""
    key, iv = bytes(16), bytes(12)
    assert aes_gcm_encrypt(key, iv, b"", b"").hex() == "58e2fccefa7e3061367f1d57a4e7455a"
    assert aes_gcm_encrypt(key, iv, b"", bytes(16)).hex() == (
        "0388dace60b6a392f328c2b971b2fe78ab6e47d42cec13bdf53a67b21257bddf"
    )


@pytest.mark.parametrize("key_length", [16, 32])
def test_aes_gcm_matches_openssl_for_every_length(key_length: int) -> None:
    rng = random.Random(key_length)
    for aad_length in (0, 1, 12, 15, 16, 17, 20, 32, 47, 60):
        for text_length in (0, 1, 15, 16, 17, 31, 32, 33, 80, 160, 1200):
            key = rng.randbytes(key_length)
            iv, aad, text = rng.randbytes(12), rng.randbytes(aad_length), rng.randbytes(text_length)
            assert aes_gcm_encrypt(key, iv, aad, text) == AESGCM(key).encrypt(iv, text, aad)


def _pair(key_length: int) -> tuple[GcmSender, Session]:
    master = os.urandom(key_length + 12)
    policy = Policy(
        key=master, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=PROFILES[key_length]
    )
    return GcmSender(master[:key_length], master[key_length:]), Session(policy)


def _packet(rng: random.Random, seq: int, ssrc: int) -> bytes:
    header = bytearray(build_header(0, 111, seq, seq * 960, ssrc))
    shape = rng.randrange(3)
    if shape == 1:  # the audio-level extension (RFC 6464, one-byte form)
        header[0] |= 0x10
        header += bytes([0xBE, 0xDE, 0, 1, 0x10, rng.randrange(128), 0, 0])
    elif shape == 2:  # two CSRCs and a two-word extension
        header[0] |= 0x12
        header += rng.randbytes(8) + bytes([0xBE, 0xDE, 0, 2]) + rng.randbytes(8)
    return bytes(header) + rng.randbytes(rng.randrange(1, 300))


@pytest.mark.parametrize("key_length", [16, 32])
def test_srtp_matches_libsrtp_across_rollover_ssrcs_and_reordering(key_length: int) -> None:
    rng = random.Random(key_length)
    ours, libsrtp = _pair(key_length)
    # Three SSRCs (a listener's three slots), from just below the sequence wrap; every
    # 50th packet overtakes the one before it.
    streams = {}
    for slot, ssrc in enumerate((0x1000, 0x2000, 0x3000)):
        seqs = [(65000 + 300 * slot + i) % 65536 for i in range(1500)]
        for i in range(10, 1499, 50):
            seqs[i], seqs[i + 1] = seqs[i + 1], seqs[i]
        streams[ssrc] = seqs
    compared = 0
    for i in range(1500):
        for ssrc, seqs in streams.items():
            packet = _packet(rng, seqs[i], ssrc)
            assert ours.protect(packet) == libsrtp.protect(packet)
            compared += 1
    assert compared > 4000


def test_a_repeated_or_too_old_index_is_refused() -> None:
    sender, _ = _pair(32)
    rng = random.Random(3)
    for seq in range(100, 200):
        sender.protect(_packet(rng, seq, 7))
    with pytest.raises(ValueError, match="refused"):
        sender.protect(_packet(rng, 150, 7))  # protected already: a nonce reused
    with pytest.raises(ValueError, match="refused"):
        sender.protect(_packet(rng, 120, 7))  # 80 behind the highest: out of the window
    sender.protect(_packet(rng, 200, 8))  # another SSRC has its own indices
    sender.protect(_packet(rng, 201, 7))


def test_malformed_packets_and_too_many_ssrcs_are_refused() -> None:
    sender, _ = _pair(16)
    header = build_header(0, 111, 1, 0, 1)
    for bad in (
        b"\x80\x6f\x00",  # shorter than a header
        bytes([0x40]) + header[1:] + b"x",  # RTP version 1
        bytes([0x8F]) + header[1:] + b"x" * 8,  # 15 CSRCs announced, 9 bytes follow
        bytes([0x90]) + header[1:] + b"\xbe\xde\x00\x10",  # extension longer than the packet
    ):
        with pytest.raises(ValueError, match="refused"):
            sender.protect(bad)
    for ssrc in range(16):
        sender.protect(build_header(0, 111, 1, 0, ssrc) + b"x")
    with pytest.raises(ValueError, match="refused"):
        sender.protect(build_header(0, 111, 1, 0, 99) + b"x")


def test_keys_of_the_wrong_size_are_refused() -> None:
    with pytest.raises(SrtpKeyError):
        GcmSender(bytes(24), bytes(12))
    with pytest.raises(SrtpKeyError):
        GcmSender(bytes(16), bytes(14))
    assert GcmSender.for_profile(b"SRTP_AES128_CM_SHA1_80", bytes(30)) is None
    assert GcmSender.for_profile(b"SRTP_AEAD_AES_128_GCM", bytes(28)) is not None
