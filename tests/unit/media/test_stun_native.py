"""The C consent STUN code (``native/stun.c``) against the Python reference in
:mod:`services.media.consent`: the same verdict on well-formed, truncated and mangled
messages, the same bytes when sealing, and HMAC-SHA1 equal to :mod:`hmac`'s."""

from __future__ import annotations

import hashlib
import hmac
import os
import random

import pytest

from services.media import consent, native
from services.media.consent import binding_request, binding_success
from tests.unit.media.test_consent import LOCAL_PWD, REMOTE_PWD, aioice_request


def _python_and_native(function: str, *args: object) -> tuple[object, object]:
    saved = consent._NATIVE
    try:
        consent._NATIVE = None
        python = getattr(consent, function)(*args)
        consent._NATIVE = native.MODULE
        return python, getattr(consent, function)(*args)
    finally:
        consent._NATIVE = saved


def test_the_c_and_python_code_agree_on_every_message() -> None:
    rng = random.Random(11)
    messages = [
        aioice_request("lufrag:rufrag", LOCAL_PWD, **{"ICE-CONTROLLING": 7}),
        aioice_request("lufrag:rufrag", LOCAL_PWD, **{"ICE-CONTROLLED": 7, "USE-CANDIDATE": None}),
        aioice_request("lufrag", LOCAL_PWD),
        aioice_request("lufrag:r", REMOTE_PWD),
        binding_success(os.urandom(12), ("192.0.2.7", 40000), LOCAL_PWD),
        binding_success(os.urandom(12), ("2001:db8::1", 3478), LOCAL_PWD),
        binding_request(os.urandom(12), "lufrag:rufrag", 5, 6, LOCAL_PWD, controlling=True),
    ]
    for data in list(messages):
        messages.extend(data[:end] for end in range(0, len(data), 3))
        for _ in range(300):
            mangled = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                mangled[rng.randrange(len(mangled))] = rng.randrange(256)
            messages.append(bytes(mangled))
    for data in messages:
        for key in (LOCAL_PWD, REMOTE_PWD):
            python, c = _python_and_native("parse_binding_request", data, "lufrag", key)
            assert python == c, data.hex()
            python, c = _python_and_native("parse_binding_response", data, key)
            assert python == c, data.hex()


@pytest.mark.parametrize("key_size", [0, 1, 24, 64, 65, 200])
def test_the_c_code_seals_what_python_seals(key_size: int) -> None:
    key = os.urandom(key_size)
    tid = os.urandom(12)
    for address in (("192.0.2.7", 40000), ("2001:db8::1", 3478)):
        python, c = _python_and_native("binding_success", tid, address, key)
        assert python == c
    for name in ("a:b", "x" * 61, "ufrag:" + "y" * 250):
        python, c = _python_and_native("binding_request", tid, name, 1234, 2**63 + 5, key, True)
        assert python == c
    lib = native.MODULE.lib
    ffi = native.MODULE.ffi
    for size in (0, 1, 55, 56, 63, 64, 65, 119, 120, 1000):
        data = os.urandom(size)
        mac = ffi.new("uint8_t[20]")
        lib.spaces_hmac_sha1(key, len(key), data, len(data), mac)
        assert bytes(mac) == hmac.digest(key, data, hashlib.sha1)
