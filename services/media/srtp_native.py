"""The fast path's own SRTP AES-GCM sender contexts (``native/srtp_gcm.c``).

libsrtp protects a packet in about 0.23 µs when its state is warm, but a fan-out to a
thousand listeners finds every listener's libsrtp state cold (session, stream, cipher,
OpenSSL's EVP and provider contexts: separate allocations, chased one after the other),
and there each protect costs over 1 µs. A :class:`GcmSender` keeps a listener's whole
sending state in one 664-byte block the egress loop prefetches, and protects with AES-NI
and PCLMULQDQ, byte for byte what libsrtp would send (the tests compare both).

Only the AEAD_AES_128_GCM and AEAD_AES_256_GCM profiles (RFC 7714) are handled, and only
for sending RTP; SRTCP and everything received stay with libsrtp. A listener whose
profile is another (AES_CM_128_HMAC_SHA1_80), or a machine whose CPU or build lacks the
code, keeps libsrtp. ``MEDIA_NATIVE_SRTP=false`` keeps libsrtp for everyone.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from services.media import native

logger = logging.getLogger(__name__)

_NATIVE: Any = native.MODULE

__all__ = [
    "GCM_PROFILES",
    "GCM_PROTECT_ADDRESS",
    "GcmSender",
    "SrtpKeyError",
    "aes_gcm_encrypt",
    "gcm_available",
    "protect_holding_gil",
]

GCM_PROFILES = {b"SRTP_AEAD_AES_128_GCM": 16, b"SRTP_AEAD_AES_256_GCM": 32}
"""The DTLS-SRTP profiles a :class:`GcmSender` serves, with their master key lengths."""
_SALT_LENGTH = 12
_TAG_LENGTH = 16

_AVAILABLE = bool(_NATIVE is not None and _NATIVE.lib.spaces_srtp_gcm_available())

GCM_PROTECT_ADDRESS: int = (
    int(
        _NATIVE.ffi.cast("uintptr_t", _NATIVE.ffi.addressof(_NATIVE.lib, "spaces_srtp_gcm_protect"))
    )
    if _NATIVE is not None
    else 0
)
"""The address of ``spaces_srtp_gcm_protect`` (the fan-out loop takes it like libsrtp's)."""

protect_holding_gil: Any = (
    ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        GCM_PROTECT_ADDRESS
    )
    if GCM_PROTECT_ADDRESS
    else None
)
"""``spaces_srtp_gcm_protect`` through ctypes, keeping the GIL (the Python egress loop)."""


def gcm_available() -> bool:
    """Whether this build and CPU can run :class:`GcmSender` (AES-NI, PCLMULQDQ)."""
    return _AVAILABLE


class SrtpKeyError(ValueError):
    """The keying material does not fit the profile."""


class GcmSender:
    """One listener's SRTP sending state for the AES-GCM profiles.

    :param master_key: the DTLS-exported master key (16 or 32 bytes).
    :param master_salt: the DTLS-exported master salt (12 bytes).
    :raises RuntimeError: when :func:`gcm_available` is false.
    :raises SrtpKeyError: on a key or salt of the wrong length.
    """

    __slots__ = ("address", "_memory")

    def __init__(self, master_key: bytes, master_salt: bytes) -> None:
        if not _AVAILABLE:
            raise RuntimeError("the native SRTP AES-GCM code is not available here")
        if len(master_key) not in (16, 32) or len(master_salt) != _SALT_LENGTH:
            raise SrtpKeyError("AES-GCM needs a 16 or 32-byte key and a 12-byte salt")
        ffi, lib = _NATIVE.ffi, _NATIVE.lib
        # One block per listener, 64-byte aligned so its hot part spans whole lines.
        self._memory = ffi.new("char[]", lib.spaces_srtp_gcm_size() + 64)
        self.address: int = (int(ffi.cast("uintptr_t", self._memory)) + 63) & ~63
        status = lib.spaces_srtp_gcm_init(
            ffi.cast("void *", self.address),
            master_key,
            len(master_key),
            master_salt,
            len(master_salt),
        )
        if status != 0:
            raise SrtpKeyError(f"the SRTP context was refused (status {status})")

    @classmethod
    def for_profile(cls, profile: bytes, keying: bytes) -> GcmSender | None:
        """A sender for a negotiated DTLS-SRTP profile, or ``None`` when this one is not
        for it (another profile, or no native code here).

        :param keying: the sender's master key followed by its master salt.
        """
        key_length = GCM_PROFILES.get(profile)
        if key_length is None or not _AVAILABLE:
            return None
        return cls(keying[:key_length], keying[key_length:])

    def protect(self, packet: bytes) -> bytes:
        """Protect one RTP packet (tests and diagnostics; the fan-out calls C directly).

        :raises ValueError: when the packet is refused (not RTP, or a repeated index).
        """
        ffi, lib = _NATIVE.ffi, _NATIVE.lib
        buffer = ffi.new("char[]", packet + bytes(_TAG_LENGTH))
        length = ffi.new("int *", len(packet))
        status = lib.spaces_srtp_gcm_protect(ffi.cast("void *", self.address), buffer, length)
        if status != 0:
            raise ValueError(f"the packet was refused (status {status})")
        return bytes(ffi.buffer(buffer, length[0]))


def aes_gcm_encrypt(key: bytes, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """Raw AES-GCM of the native code (ciphertext and tag), for tests against OpenSSL."""
    if not _AVAILABLE:
        raise RuntimeError("the native SRTP AES-GCM code is not available here")
    ffi, lib = _NATIVE.ffi, _NATIVE.lib
    text = ffi.new("uint8_t[]", plaintext or b"\0")
    tag = ffi.new("uint8_t[16]")
    status = lib.spaces_aes_gcm_encrypt(key, len(key), iv, aad, len(aad), text, len(plaintext), tag)
    if status != 0:
        raise SrtpKeyError(f"refused (status {status})")
    return bytes(ffi.buffer(text, len(plaintext))) + bytes(tag)
