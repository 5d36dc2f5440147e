"""Consent messages agree with aioice's own STUN code, both ways, in C (``native/stun.c``)
and in Python (``test_stun_native.py`` holds the two to the same bytes); the checker
expires a silent peer and keeps an answering one."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from aioice import stun

from services.media import consent, native
from services.media.consent import (
    CHECKS_PER_SLICE,
    CheckParams,
    ConsentChecker,
    ConsentTarget,
    binding_request,
    binding_success,
    parse_binding_request,
    parse_binding_response,
)

LOCAL_PWD = b"local-password-0123456789"
REMOTE_PWD = b"remote-password-0123456789"
PARAMS = CheckParams("r:l", 1, 2, False, REMOTE_PWD, ("127.0.0.1", 9))


@pytest.fixture(autouse=True, params=["native", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the C STUN code and with the Python one."""
    if request.param == "python":
        monkeypatch.setattr(consent, "_NATIVE", None)
    return str(request.param)


def test_the_native_stun_code_is_built_and_used_by_default() -> None:
    assert native.MODULE is not None, "make builds _spaces_media_fanout"


def aioice_request(username: str, password: bytes, **extra: object) -> bytes:
    message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    message.attributes["USERNAME"] = username
    message.attributes["PRIORITY"] = 1853824767
    for name, value in extra.items():
        message.attributes[name] = value
    message.add_message_integrity(password)
    message.add_fingerprint()
    return bytes(message)


def test_a_peers_check_is_parsed_only_when_authentic() -> None:
    data = aioice_request("lufrag:rufrag", LOCAL_PWD, **{"ICE-CONTROLLING": 7})
    parsed = parse_binding_request(data, "lufrag", LOCAL_PWD)
    assert parsed is not None
    assert parsed.transaction_id == data[8:20] and not parsed.use_candidate
    assert parsed.role_attribute == 0x802A
    assert parse_binding_request(data, "lufrag", b"wrong") is None, "integrity"
    assert parse_binding_request(data, "other", LOCAL_PWD) is None, "username"
    tampered = bytearray(data)
    tampered[-1] ^= 1
    assert parse_binding_request(bytes(tampered), "lufrag", LOCAL_PWD) is None, "fingerprint"
    nominating = aioice_request("lufrag:rufrag", LOCAL_PWD, **{"USE-CANDIDATE": None})
    assert parse_binding_request(nominating, "lufrag", LOCAL_PWD).use_candidate  # type: ignore[union-attr]
    assert parse_binding_request(b"\x17\xfe\xfd" + os.urandom(40), "lufrag", LOCAL_PWD) is None


@pytest.mark.parametrize("address", [("192.0.2.7", 40000), ("2001:db8::1", 3478)])
def test_our_answer_is_what_aioice_expects(address: tuple[str, int]) -> None:
    tid = os.urandom(12)
    message = stun.parse_message(binding_success(tid, address, LOCAL_PWD))
    assert message.message_class == stun.Class.RESPONSE and message.transaction_id == tid
    assert message.attributes["XOR-MAPPED-ADDRESS"] == address
    assert message.check_message_integrity(LOCAL_PWD)
    assert "FINGERPRINT" in message.attributes  # parse_message checked its value


def test_our_check_is_what_aioice_expects_and_its_answer_is_parsed() -> None:
    tid = os.urandom(12)
    request = stun.parse_message(binding_request(tid, "rufrag:lufrag", 1234, 99, REMOTE_PWD))
    assert request.message_class == stun.Class.REQUEST and request.transaction_id == tid
    assert request.attributes["USERNAME"] == "rufrag:lufrag"
    assert request.attributes["PRIORITY"] == 1234
    assert request.attributes["ICE-CONTROLLED"] == 99
    assert request.check_message_integrity(REMOTE_PWD)
    controlling = stun.parse_message(
        binding_request(tid, "rufrag:lufrag", 1234, 99, REMOTE_PWD, controlling=True)
    )
    assert controlling.attributes["ICE-CONTROLLING"] == 99
    assert PARAMS.request(tid) == binding_request(tid, "r:l", 1, 2, REMOTE_PWD)
    answer = stun.Message(
        message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE, transaction_id=tid
    )
    answer.attributes["XOR-MAPPED-ADDRESS"] = ("127.0.0.1", 5000)
    answer.add_message_integrity(REMOTE_PWD)
    answer.add_fingerprint()
    assert parse_binding_response(bytes(answer), REMOTE_PWD) == (tid, True)
    assert parse_binding_response(bytes(answer), b"forged") is None
    refusal = stun.Message(
        message_method=stun.Method.BINDING, message_class=stun.Class.ERROR, transaction_id=tid
    )
    refusal.attributes["ERROR-CODE"] = (401, "Unauthenticated")
    refusal.add_fingerprint()
    assert parse_binding_response(bytes(refusal), REMOTE_PWD) == (tid, False)


async def test_the_checker_keeps_an_answering_peer_and_expires_a_silent_one() -> None:
    checker = ConsentChecker(interval=0.05, failures=3)
    expired: list[str] = []
    answers_seen: list[tuple[str, int]] = []
    answering = True

    def target(name: str, answers: bool) -> ConsentTarget:
        def send(data: bytes, address: tuple[str, int]) -> None:
            request = stun.parse_message(data)
            assert request.check_message_integrity(REMOTE_PWD)
            if answers and answering:
                reply = stun.Message(
                    message_method=stun.Method.BINDING,
                    message_class=stun.Class.RESPONSE,
                    transaction_id=request.transaction_id,
                )
                reply.attributes["XOR-MAPPED-ADDRESS"] = ("127.0.0.1", 1)
                reply.add_message_integrity(REMOTE_PWD)
                reply.add_fingerprint()
                asyncio.get_running_loop().call_soon(checker.answered, bytes(reply))

        return ConsentTarget(
            check=lambda: PARAMS,
            send=send,
            expired=lambda: expired.append(name),
            on_answer=lambda address: answers_seen.append(address),
        )

    checker.start()
    live, silent = target("live", True), target("silent", False)
    checker.track(live)
    checker.track(silent)
    await asyncio.sleep(0.5)
    assert expired == ["silent"] and live.active and live.failures == 0
    assert answers_seen and set(answers_seen) == {("127.0.0.1", 9)}
    answering = False
    await asyncio.sleep(0.5)
    assert expired == ["silent", "live"]
    assert len(checker) == 0
    await checker.stop()


async def test_consent_runs_out_within_the_timeout_of_the_last_answer() -> None:
    """RFC 7675: stop within 30 s of the last answer. Counting misses alone could take one
    more randomized interval; the timeout bounds it whatever the draws."""
    checker = ConsentChecker(interval=0.05, failures=5)
    assert checker.timeout == pytest.approx(0.3)
    expired_at: list[float] = []
    targets = [
        ConsentTarget(
            check=lambda: PARAMS,
            send=lambda data, address: None,  # never answered
            expired=lambda: expired_at.append(time.monotonic()),
        )
        for _ in range(40)
    ]
    checker.start()
    started = time.monotonic()
    for target in targets:
        target.last_answer = started
        checker.track(target)
    # One more with nothing to check (its pair is not on the mux): never expired by time.
    idle = ConsentTarget(check=lambda: None, send=lambda data, address: None, expired=lambda: 1 / 0)
    idle.last_answer = started
    checker.track(idle)
    await asyncio.sleep(0.6)
    await checker.stop()
    assert len(expired_at) == 40
    # The timer may fire a little late on a loaded machine; never a whole interval late.
    assert max(expired_at) - started <= checker.timeout + 0.04
    assert idle.active, "no check sent, so none unanswered"


async def test_a_round_of_checks_goes_out_in_slices_between_other_callbacks() -> None:
    """Ingress runs on the same loop: a round of many checks must not hold it."""
    checker = ConsentChecker(interval=0.05, failures=100)
    log: list[str] = []

    def target() -> ConsentTarget:
        return ConsentTarget(
            check=lambda: PARAMS,
            send=lambda data, address: log.append("check"),
            expired=lambda: None,
        )

    count = 3 * CHECKS_PER_SLICE + 1
    for _ in range(count):
        checker.track(target())
    # Everyone due at once (equal times and rising tie-breakers keep it a heap).
    due = time.monotonic() - 1
    checker._due = [(due, i, entry[2]) for i, entry in enumerate(checker._due)]
    checker.start()
    loop = asyncio.get_running_loop()
    arriving = True

    def packet() -> None:  # media packets, arriving all the time on the same loop
        log.append("packet")
        if arriving:
            loop.call_soon(packet)

    packet()
    await asyncio.sleep(0.01)
    arriving = False
    checker.cancel()
    assert log.count("check") == count, "every due check went out"
    runs = "".join("c" if entry == "check" else " " for entry in log).split()
    assert max(len(run) for run in runs) <= CHECKS_PER_SLICE, log


def test_truncated_or_mangled_messages_are_refused_without_raising() -> None:
    data = aioice_request("lufrag:rufrag", LOCAL_PWD, **{"ICE-CONTROLLING": 7})
    for end in range(len(data)):
        assert parse_binding_request(data[:end], "lufrag", LOCAL_PWD) is None
        assert parse_binding_response(data[:end], LOCAL_PWD) is None
    rng = __import__("random").Random(7)
    for _ in range(2000):
        mangled = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        parsed = parse_binding_request(bytes(mangled), "lufrag", LOCAL_PWD)
        assert parsed is None or bytes(mangled) == data
