"""Hostile input against the real processes (the stack ``make up`` starts, on free ports).

1. **Every RPC, fuzzed.** The services and methods are read from the generated descriptors
   (every ``spaces.*.v1.*_service_pb2`` in ``build/gen``), so a new RPC is fuzzed without
   touching this file. Hypothesis builds each request from its descriptor: random and
   boundary values per field type (empty, the protovalidate limit and one past it, ~1 MiB
   strings, unicode edge cases, NUL, negative and extreme integers, NaN and infinities,
   unknown enum numbers, repeated and map fields with thousands of items, messages nested
   several levels deep, random bytes), mixed with real resource names of the run (a live
   Space, its participants, a media grant) so calls get past "not found" into the
   services' logic. Each goes over gRPC with a user's token or none. No call may end in
   INTERNAL, UNKNOWN or DATA_LOSS. Bytes that are no valid message at all (corrupt wire
   format, a string field holding invalid UTF-8) are sent to every RPC too and must be
   INVALID_ARGUMENT.
2. **Hostile HTTP through the gateway.** Invalid UTF-8 (raw and percent-encoded), broken
   JSON, 10,000 levels of nesting, wrong JSON types, bad query parameters: a 4xx with a JSON
   ``google.rpc.Status`` body, never a 5xx.
3. **Oversized messages.** A 5 MiB gRPC request to every service is RESOURCE_EXHAUSTED (one
   just under the limit is not), a 5 MiB HTTP body is 413 with the status as JSON.
4. **Hostile SDP offers** to MediaService.Negotiate with a real media grant: malformed, at
   and past the proto's 64 KiB limit, video, data channel, no audio, no Opus, too many
   m-lines, missing ICE or DTLS attributes. Each is refused (INVALID_ARGUMENT, reason
   ``INVALID_SDP`` or the validation's ``INVALID_ARGUMENT``; RESOURCE_EXHAUSTED past the
   transport limit) and the grant is not spent: it still opens a session afterwards. The
   same offers, and ICE credentials outside RFC 8839's grammar, to RestartIce on a live
   session: refused the same way, and the session lives on.
5. **Nothing died.** Every process is still running and reports SERVING, and no service
   logged an error (or a traceback) while this module ran.

Reproducible: Hypothesis is derandomized (the same examples every run) and keeps no example
database. ``HOSTILE_FUZZ_EXAMPLES`` (default 10) sets the examples per RPC; with the default
the module takes about a minute on a loaded 2-core machine, most of it the stack starting.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import pkgutil
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
import spaces
from buf.validate import validate_pb2
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spaces.common.v1 import options_pb2

from services.common.server import MAX_RECEIVE_MESSAGE_BYTES
from tests.resilience.harness import (
    Api,
    CallResult,
    LoopThread,
    User,
    create_live_space,
    signup,
)
from tests.security.test_media_grants import audio_offer
from tools.devstack import Stack

Code = grpc.StatusCode

#: What a server answers only when it failed, never for anything a client sent.
SERVER_FAULTS = frozenset({Code.INTERNAL, Code.UNKNOWN, Code.DATA_LOSS})

EXAMPLES = int(os.environ.get("HOSTILE_FUZZ_EXAMPLES", "10"))
HUGE = 1024 * 1024  # a ~1 MiB string: under the 4 MiB transport limit, far over any rule
MANY = 5000  # items of a "many items" repeated or map field
MAX_DEPTH = 5  # nesting of generated messages
# The most one generated message (at any depth) holds: a little past the transport's 4 MiB
# limit, so some requests test it. Without a budget, "many items" of messages that hold
# many items of ~1 MiB strings multiply into gigabytes (an earlier version was OOM-killed).
MESSAGE_BUDGET = 5 * 1024 * 1024
SMALL_ITEM = 1024  # items repeated MANY times must be at most this big
UNARY_TIMEOUT_S = 10.0
# A server stream that is accepted may legitimately send nothing for a while (a
# notification stream): waiting a second for its first message is enough to see it fail.
STREAM_TIMEOUT_S = 1.0
FIVE_MIB = 5 * 1024 * 1024
RANDOM_MIB = random.Random(7).randbytes(HUGE)  # seeded: the same bytes every run
# Anonymous HTTP requests are rate limited per client address; the gateway trusts
# X-Forwarded-For from 127.0.0.1, so this module's requests draw on a bucket of their own
# and cannot starve the other security modules sharing the stack.
CLIENT_ADDRESS = {"X-Forwarded-For": "203.0.113.77"}


# -- the RPCs, from the generated descriptors ------------------------------------------


def _service_modules() -> list[Any]:
    """Every generated ``*_service_pb2`` module of the product (not the test-only protos)."""
    found = []
    for module in pkgutil.walk_packages(spaces.__path__, "spaces."):
        if module.name.endswith("_service_pb2") and ".testing." not in module.name:
            found.append(importlib.import_module(module.name))
    return found


def all_methods() -> list[MethodDescriptor]:
    """Every method of every product service, in a stable order."""
    methods = [
        method
        for module in _service_modules()
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    return sorted(methods, key=lambda m: m.full_name)


METHODS = all_methods()


def _package(method: MethodDescriptor) -> str:
    """``spaces.rooms.v1.RoomsService.X`` → ``rooms`` (the stack's process name)."""
    return method.containing_service.full_name.split(".")[1]


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# -- strategies built from a descriptor --------------------------------------------------

_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

#: Strings known to trip servers up: encodings, injections, paths, numbers as text.
EDGE_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t\r\n",
    "\u202e\u0645\u0631\u062d\u0628\u0627",  # right-to-left override, Arabic
    "\ufeff",  # byte order mark
    "a\u0301" * 50,  # combining marks
    "\U0001f3f3\ufe0f\u200d\U0001f308" * 100,  # a ZWJ emoji sequence, 100 times
    "\U0010ffff\uffff\ufffe",  # non-characters
    "\U0001d518\U0001d52b\U0001d526",  # astral plane letters
    "é" * 40_000,  # two UTF-8 bytes per character
    "null",
    "-1",
    "9" * 40,
    "1e309",
    "NaN",
    "' OR 1=1 --",
    "'); DROP TABLE spaces; --",
    "<script>alert(1)</script>",
    "${jndi:ldap://x/a}",
    "%s%s%s%n",
    "../../../../etc/passwd",
    "http://169.254.169.254/latest/meta-data/",
    "users/me",
    "users/",
    "users/-",
    "spaces/",
    "spaces/-",
    "spaces/" + "a" * 1000,
    "spaces/a/participants/",
    "spaces/*/participants/*",
    "mediaNodes/",
    "mediaNodes/../../x",
    "users/me/webhooks/",
    "*",
    "x" * HUGE,
)


def _string_rules(field: FieldDescriptor) -> Any:
    rules = field.GetOptions().Extensions[validate_pb2.field]
    if rules.WhichOneof("type") == "string":
        return rules.string
    if rules.WhichOneof("type") == "repeated" and rules.repeated.items.HasField("string"):
        return rules.repeated.items.string
    return None


def _int_rules(field: FieldDescriptor) -> dict[str, int]:
    """The integer bounds of a field's protovalidate rules (``gt``, ``gte``, ``lt``, ...)."""
    rules = field.GetOptions().Extensions[validate_pb2.field]
    kind = rules.WhichOneof("type")
    if kind is None or kind in ("string", "bytes", "repeated", "map", "enum", "bool"):
        return {}
    numeric = getattr(rules, kind)
    found: dict[str, int] = {}
    for name in ("gt", "gte", "lt", "lte", "const"):
        with contextlib.suppress(ValueError, AttributeError):
            if numeric.HasField(name) and isinstance(getattr(numeric, name), int):
                found[name] = getattr(numeric, name)
    return found


def string_values(field: FieldDescriptor, known: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Random text, edge cases, the run's real names, and the field's limits ±1."""
    choices: list[st.SearchStrategy[str]] = [
        st.sampled_from(known),
        st.sampled_from(EDGE_STRINGS),
        st.text(max_size=40),
    ]
    rules = _string_rules(field)
    if rules is not None:
        limits = []
        for name in ("max_len", "min_len", "len"):
            if rules.HasField(name):
                n = getattr(rules, name)
                limits += ["x" * n, "x" * (n + 1), "x" * max(0, n - 1), "é" * (n + 1)]
        for name in ("max_bytes", "min_bytes", "len_bytes"):
            if rules.HasField(name):
                n = getattr(rules, name)
                limits += ["x" * n, "x" * (n + 1), "é" * (n // 2 + 1)]
        if rules.HasField("prefix"):
            limits += [rules.prefix, rules.prefix + "x" * 70_000, rules.prefix + "\x00"]
        if limits:
            choices.append(st.sampled_from(limits))
    return st.one_of(choices)


def scalar_values(field: FieldDescriptor, known: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """Values of a non-message field, boundaries first."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return string_values(field, known)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"", b"\xff\xfe\xfd", b"\x00" * 1024, RANDOM_MIB]),
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = [value.number for value in field.enum_type.values]
        # Open (proto3) enums carry unknown numbers on the wire; servers must refuse them.
        unknown = [-1, max(numbers) + 1, 2**31 - 1, -(2**31)]
        return st.one_of(st.sampled_from(numbers), st.sampled_from(unknown))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.one_of(
            st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-300, -1.0]),
            st.floats(width=32) if kind == FieldDescriptor.TYPE_FLOAT else st.floats(),
        )
    low, high = _INT_RANGES[kind]
    bounds = _int_rules(field).values()
    edges = [0, 1, -1, low, high, low + 1, high - 1, *(b + d for b in bounds for d in (-1, 0, 1))]
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high)
    )


def plausible_strings(field: FieldDescriptor, known: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Strings that pass the field's rules, so a call gets into the handler's logic."""
    rules = _string_rules(field)
    if rules is None:
        return st.one_of(st.sampled_from(known), st.text(max_size=20))
    if rules.HasField("uuid") and rules.uuid:
        return st.uuids().map(str)
    if rules.HasField("uri") and rules.uri or rules.prefix.startswith("http"):
        return st.sampled_from(["https://example.com/hook", "https://127.0.0.1:1/x"])
    if rules.pattern:
        matching = [k for k in known if re.search(rules.pattern, k)]
        generated = st.from_regex(rules.pattern, fullmatch=True)
        return st.one_of(st.sampled_from(matching), generated) if matching else generated
    high = min(rules.max_len if rules.HasField("max_len") else 30, 30)
    low = min(rules.min_len, high)
    return st.text(
        st.characters(codec="utf-8", exclude_characters="\x00"), min_size=low, max_size=high
    )


def plausible_values(field: FieldDescriptor, known: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """Values of a non-message field that its rules accept (or near enough)."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return plausible_strings(field, known)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return st.sampled_from([v.number for v in field.enum_type.values if v.number] or [0])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(0, 100)
    limit_low, limit_high = _INT_RANGES[kind]
    rules = _int_rules(field)
    if "const" in rules:
        return st.just(rules["const"])
    low = rules.get("gte", rules["gt"] + 1 if "gt" in rules else 0)
    high = rules.get("lte", rules["lt"] - 1 if "lt" in rules else max(low, 0) + 100)
    low, high = max(low, limit_low), min(high, limit_high)
    return st.integers(low, max(low, high))


_PLAUSIBLE_MESSAGES: dict[str, st.SearchStrategy[Message]] = {
    # Timestamps near now (past or future): far ones are the hostile side's job.
    "google.protobuf.Timestamp": st.integers(-30 * 86400, 30 * 86400).map(
        lambda delta: timestamp_pb2.Timestamp(seconds=int(time.time()) + delta)
    ),
    "google.protobuf.Duration": st.integers(0, 3600).map(
        lambda s: duration_pb2.Duration(seconds=s)
    ),
}


@functools.cache
def field_values(
    field: FieldDescriptor, depth: int, known: tuple[str, ...]
) -> st.SearchStrategy[Any]:
    """Values for one field: ``None`` (unset) or something to assign.

    Two in three set values pass the field's own rules, so most requests hold one or two
    hostile fields among plausible ones and reach the handler, not just validation.
    """
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key = st.one_of(
            plausible_values(field.message_type.fields_by_name["key"], known),
            scalar_values(field.message_type.fields_by_name["key"], known),
        )
        value_field = field.message_type.fields_by_name["value"]
        value = field_values(value_field, depth + 1, known).filter(lambda v: v is not None)
        return st.one_of(
            st.none(),
            st.dictionaries(key, value, max_size=4),
            # Many entries: keys must differ, so number them.
            value.map(lambda v: {_key_of(field, i): v for i in range(_many(v))}),
        )
    if field.message_type is not None:
        if depth >= MAX_DEPTH:
            return st.none()
        single: st.SearchStrategy[Any] = messages(field.message_type, depth + 1, known)
        plausible = _PLAUSIBLE_MESSAGES.get(field.message_type.full_name)
        if plausible is not None:
            single = st.one_of(plausible, plausible, single)
    else:
        fair = plausible_values(field, known)
        single = st.one_of(fair, fair, scalar_values(field, known))
    if field.is_repeated:
        return st.one_of(
            st.none(),
            st.lists(single, max_size=3),
            st.lists(single, max_size=3),
            single.map(lambda v: [v] * _many(v)),
        )
    return st.one_of(st.none(), single)


def _size(value: Any) -> int:
    """About how many bytes ``value`` takes on the wire (an upper bound is enough)."""
    if isinstance(value, Message):
        return value.ByteSize()
    if isinstance(value, str):
        return 4 * len(value)
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, list):
        return sum(_size(item) for item in value)
    if isinstance(value, dict):
        return sum(_size(k) + _size(v) for k, v in value.items())
    return 10


def _many(item: Any) -> int:
    """How often to repeat ``item`` for a "many items" field: MANY times if it is small."""
    return MANY if _size(item) <= SMALL_ITEM else 3


def _key_of(field: FieldDescriptor, index: int) -> Any:
    """The ``index``-th distinct key of a map field's key type."""
    assert field.message_type is not None
    kind = field.message_type.fields_by_name["key"].type
    if kind == FieldDescriptor.TYPE_STRING:
        return f"k{index}"
    if kind == FieldDescriptor.TYPE_BOOL:
        return index % 2 == 0
    return index


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_is_message = field.message_type.fields_by_name["value"].message_type is not None
        for key, item in value.items():
            if value_is_message:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        if field.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


@functools.cache
def messages(
    descriptor: Descriptor, depth: int, known: tuple[str, ...]
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with any subset of fields set to hostile values."""
    fields = list(descriptor.fields)
    values = st.tuples(*(field_values(f, depth, known) for f in fields))

    def build(drawn: tuple[Any, ...]) -> Message:
        cls: Any = GetMessageClass(descriptor)
        message: Message = cls()
        used = 0
        for f, value in zip(fields, drawn, strict=True):
            if value is None:
                continue
            size = _size(value)
            if used + size > MESSAGE_BUDGET:
                continue  # this field would take the message past its budget: left unset
            used += size
            try:
                _assign(message, f, value)
            except (ValueError, TypeError, OverflowError):
                # A value the Python runtime itself refuses to hold (e.g. a well-known
                # type's own checks); a client could not send it with this runtime either.
                pass
        return message

    return values.map(build)


# -- calls -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one raw call ended."""

    code: Code
    details: str
    reason: str = ""


def _reason(error: grpc.aio.AioRpcError) -> str:
    with contextlib.suppress(Exception):
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return str(info.reason)
    return ""


async def call_raw(
    channel: grpc.aio.Channel, method: MethodDescriptor, payload: bytes, token: str | None
) -> Outcome:
    """Send ``payload`` as the request bytes of ``method``; read at most one response."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    try:
        if method.server_streaming:
            stream = channel.unary_stream(_path(method), None, None)(
                payload, timeout=STREAM_TIMEOUT_S, metadata=metadata
            )
            try:
                async for _ in stream:
                    break
            finally:
                stream.cancel()
        else:
            await channel.unary_unary(_path(method), None, None)(
                payload, timeout=UNARY_TIMEOUT_S, metadata=metadata
            )
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code(), error.details() or "", _reason(error))
    return Outcome(Code.OK, "")


def _channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )


# -- the fuzzing world ---------------------------------------------------------------------


@dataclass
class Fuzz:
    """The run's accounts and names, and channels on a loop of their own.

    Hypothesis drives synchronous test functions, so the calls run on a
    :class:`~tests.resilience.harness.LoopThread` and the test waits for each.
    """

    loops: LoopThread
    channels: dict[str, grpc.aio.Channel]
    token: str
    known: tuple[str, ...]
    codes: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    reached: int = 0  # fuzzed calls that got past authentication and validation

    def call(self, method: MethodDescriptor, payload: bytes, token: str | None) -> Outcome:
        outcome: Outcome = self.loops.run(
            call_raw(self.channels[_package(method)], method, payload, token), timeout=60
        )
        return outcome


async def _fuzz_world(stack: Stack) -> tuple[dict[str, grpc.aio.Channel], str, tuple[str, ...]]:
    """Accounts and resources whose names the fuzzer mixes into its strings."""
    api = Api(stack)
    try:
        fuzzer, other = await signup(api, "fuzz"), await signup(api, "fzoth")
        own = await create_live_space(api, fuzzer, "fuzzed")
        theirs = await create_live_space(api, other, "fuzzed too")
        await api.ok(
            "RoomsService.JoinSpace", token=other.token, name=f"spaces/{own}",
            request_id=str(uuid.uuid4()),
        )  # fmt: skip
        joined = await api.ok(
            "RoomsService.JoinSpace", token=fuzzer.token, name=f"spaces/{theirs}",
            request_id=str(uuid.uuid4()),
        )  # fmt: skip
    finally:
        await api.close()
    node = f"mediaNodes/{joined.media_grant.endpoint.node}"
    known = (
        f"spaces/{own}",
        f"spaces/{theirs}",
        f"spaces/{own}/participants/{other.id}",
        f"spaces/{own}/participants/{fuzzer.id}",
        f"spaces/{theirs}/participants/{other.id}",
        fuzzer.name,
        other.name,
        other.handle,
        f"{fuzzer.name}/webhooks/w1",
        f"{fuzzer.name}/devices/d1",
        node,
        f"{node}/sessions/0123456789abcdef",
        joined.media_grant.token,
        str(uuid.uuid4()),
        own,
        other.id,
    )
    channels = {
        name: _channel(running.grpc_port)
        for name, running in stack.services.items()
        if running.grpc_port
    }
    return channels, fuzzer.token, known


@pytest.fixture(scope="module")
def fuzz(stack: Stack) -> Iterator[Fuzz]:
    loops = LoopThread()
    try:
        channels, token, known = loops.run(_fuzz_world(stack), timeout=60)
        state = Fuzz(loops, channels, token, known)
        yield state
        print(
            f"\nhostile input: {state.calls} fuzzed gRPC calls over {len(METHODS)} RPCs"
            f" ({state.reached} fuzzed ones past authentication and validation);"
            f" codes {dict(state.codes.most_common())}"
        )
    finally:

        async def close() -> None:
            for channel in channels.values():
                await channel.close(None)

        with contextlib.suppress(Exception):
            loops.run(close())
        loops.close()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name.split(".", 3)[3])
def test_fuzzed_requests_never_fault_a_server(fuzz: Fuzz, method: MethodDescriptor) -> None:
    if _package(method) not in fuzz.channels:
        pytest.skip(f"{_package(method)} is not part of the stack")
    requests = messages(method.input_type, 0, fuzz.known)
    # Mostly with the user's token (reaching validation and the handlers); some anonymous.
    tokens = st.sampled_from([fuzz.token, fuzz.token, fuzz.token, None])

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=requests, token=tokens)
    def check(request: Message, token: str | None) -> None:
        outcome = fuzz.call(method, request.SerializeToString(), token)
        fuzz.calls += 1
        fuzz.codes[outcome.code.name] += 1
        fuzz.reached += outcome.code not in (Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED)
        assert outcome.code not in SERVER_FAULTS, (
            f"{method.full_name} answered {outcome.code.name}: {outcome.details[:500]}"
        )

    check()


#: Request bytes that no message type parses: a corrupt tag, a length running past the
#: end, a group end tag that was never opened.
UNDECODABLE: dict[str, bytes] = {
    "corrupt": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    "truncated": b"\x0a\x7fabc",
    "stray end group": b"\x0c",
    # Unknown groups nest without a schema to stop them: the parser's depth limit must.
    "10,000 nested groups": b"\x0b" * 10_000 + b"\x0c" * 10_000,
}


def undecodable(method: MethodDescriptor) -> dict[str, bytes]:
    """:data:`UNDECODABLE`, plus invalid UTF-8 in the request's first string field (in a
    message without one, the same bytes are merely an unknown field, which is fine)."""
    payloads = dict(UNDECODABLE)
    strings = [f for f in method.input_type.fields if f.type == FieldDescriptor.TYPE_STRING]
    if strings:
        invalid = b"ok\xc3\x28\xff\xfe"
        tag = _varint(strings[0].number << 3 | 2)
        payloads["invalid UTF-8"] = tag + _varint(len(invalid)) + invalid
    return payloads


def test_undecodable_requests_are_invalid_argument(fuzz: Fuzz) -> None:
    wrong = []
    sent = 0
    for method in METHODS:
        if _package(method) not in fuzz.channels:
            continue
        for label, payload in undecodable(method).items():
            outcome = fuzz.call(method, payload, fuzz.token)
            sent += 1
            # Internal RPCs refuse a user before reading the request at all.
            if outcome.code not in (Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED):
                wrong.append(f"{method.full_name} ({label}): {outcome.code.name} {outcome.details}")
    print(f"\nhostile input: {sent} undecodable requests, {len(wrong)} not INVALID_ARGUMENT")
    assert not wrong, "\n".join(wrong[:20])


# -- oversized messages ------------------------------------------------------------------


def _first_method(package: str) -> MethodDescriptor:
    """An app-facing unary method of the service, for the size checks."""
    return next(
        m
        for m in METHODS
        if _package(m) == package
        and not m.server_streaming
        and m.GetOptions().Extensions[options_pb2.access] == options_pb2.ACCESS_USER
    )


def test_a_5_mib_request_is_resource_exhausted_at_every_service(fuzz: Fuzz) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for package in sorted(fuzz.channels):
        method = _first_method(package)
        # A length-delimited field 1 whose content takes the message past the limit.
        body = b"x" * FIVE_MIB
        over = fuzz.call(method, b"\x0a" + _varint(len(body)) + body, fuzz.token)
        # Just under the limit the same shape is read (and refused by validation or the
        # handler as too long, or not found): the limit is the transport's, not a crash.
        under_body = b"x" * (MAX_RECEIVE_MESSAGE_BYTES - 16)
        under = fuzz.call(method, b"\x0a" + _varint(len(under_body)) + under_body, fuzz.token)
        seen[package] = (over.code.name, under.code.name)
    print(f"\nhostile input: 5 MiB / just under 4 MiB per service: {seen}")
    for package, (over_code, under_code) in seen.items():
        assert over_code == "RESOURCE_EXHAUSTED", f"{package} took 5 MiB: {over_code}"
        assert under_code not in {"RESOURCE_EXHAUSTED", *(c.name for c in SERVER_FAULTS)}, (
            f"{package} refused a request under the limit with {under_code}"
        )


# -- the gateway -----------------------------------------------------------------------


@dataclass
class Gateway:
    """An HTTP client of the stack's gateway and a user per service (own rate buckets)."""

    client: httpx.AsyncClient
    users: dict[str, User]
    space: str
    node: str


@pytest.fixture(scope="module")
async def gateway(stack: Stack) -> AsyncIterator[Gateway]:
    api = Api(stack)
    try:
        users = {name: await signup(api, f"gw{name[:3]}") for name in ("rooms", "ident", "pay")}
        space = await create_live_space(api, users["rooms"], "hostile http")
        joined = await api.ok(
            "RoomsService.JoinSpace", token=users["pay"].token, name=f"spaces/{space}",
            request_id=str(uuid.uuid4()),
        )  # fmt: skip
    finally:
        await api.close()
    port = stack.services["gateway"].http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield Gateway(client, users, space, joined.media_grant.endpoint.node)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


#: Bodies no route can bind. Sent to one JSON-body route of each service.
HOSTILE_BODIES: dict[str, bytes] = {
    "raw invalid UTF-8": b"\xff\xfe\xfd\xfc",
    "invalid UTF-8 in a string": b'{"requestId": "\xc3\x28\xff"}',
    "overlong UTF-8": b'{"requestId": "\xc0\xaf"}',
    "lone surrogate escape": b'{"requestId": "\\ud800"}',
    "broken JSON": b'{"requestId": ',
    "trailing garbage": b'{"requestId": "a"} x',
    "10,000 nested arrays": _nested(10_000),
    "10,000 nested objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "nesting inside a field": b'{"requestId": ' + _nested(10_000) + b"}",
    "a list": b"[]",
    "null": b"null",
    "a number": b"1e999",
    "a string": b'"hello"',
    "wrong type of a field": b'{"requestId": 12}',
    "object for a string": b'{"requestId": {"a": 1}}',
    "huge number": b'{"requestId": "x", "amount": {"units": 1e400}}',
    "NUL escape": b'{"requestId": "a\\u0000b"}',
}


def _routes(g: Gateway) -> dict[str, str]:
    """One route with a JSON body per service, as the apps call them."""
    return {
        "rooms": "/v1/spaces",
        "identity": "/v1/users/me:follow",
        "notify": "/v1/users/me/webhooks",
        "payments": f"/v1/spaces/{g.space}/tips",
        "media": f"/v1/mediaNodes/{g.node}/sessions:negotiate",
    }


def _check_error_reply(label: str, reply: httpx.Response) -> str | None:
    """``None`` when ``reply`` is a 4xx with a JSON google.rpc.Status, else what is wrong."""
    if not 400 <= reply.status_code < 500:
        return f"{label}: HTTP {reply.status_code} {reply.text[:200]}"
    try:
        body = reply.json()
    except ValueError:
        return f"{label}: HTTP {reply.status_code} with a non-JSON body {reply.text[:200]!r}"
    if not isinstance(body, dict) or not isinstance(body.get("code"), int):
        return f"{label}: HTTP {reply.status_code} body is no google.rpc.Status: {body!r}"
    return None


async def test_hostile_http_bodies_are_4xx_json(gateway: Gateway) -> None:
    g = gateway
    wrong: list[str] = []
    statuses: Counter[int] = Counter()
    for service, path in _routes(g).items():
        user = g.users["pay" if service in ("payments", "media") else "rooms"]
        headers = {
            **CLIENT_ADDRESS,
            "Authorization": f"Bearer {user.token}",
            "Content-Type": "application/json",
        }
        for label, body in HOSTILE_BODIES.items():
            reply = await g.client.post(path, content=body, headers=headers)
            statuses[reply.status_code] += 1
            if problem := _check_error_reply(f"POST {path} ({label})", reply):
                wrong.append(problem)
    print(f"\nhostile input: hostile HTTP bodies -> {dict(statuses)}")
    assert not wrong, "\n".join(wrong)


async def test_hostile_paths_and_queries_are_4xx_json(gateway: Gateway) -> None:
    g = gateway
    headers = {**CLIENT_ADDRESS, "Authorization": f"Bearer {g.users['ident'].token}"}
    requests = {
        "invalid UTF-8 in a path variable": "/v1/spaces/%FF%FE",
        "overlong UTF-8 in a path variable": "/v1/users/%C0%AF",
        "NUL in a path variable": "/v1/spaces/a%00b",
        "a 10,000-character path variable": "/v1/spaces/" + "a" * 10_000,
        "invalid UTF-8 in a query": "/v1/spaces?filter=%FF%FE",
        "a page size that is no number": "/v1/spaces?pageSize=abc",
        "a page size past int32": "/v1/spaces?pageSize=99999999999999999999",
        "a negative page size": "/v1/spaces?pageSize=-5",
        "an unknown enum in a query": f"/v1/spaces/{g.space}/participants?role=NOT_A_ROLE",
        "a page token of garbage": "/v1/spaces?pageToken=%FF%00%01",
        "an unknown query parameter": "/v1/spaces?no.such.field=1",
        "a repeated scalar query parameter": "/v1/spaces?pageSize=1&pageSize=2",
    }
    wrong: list[str] = []
    statuses: Counter[int] = Counter()
    for label, path in requests.items():
        reply = await g.client.get(path, headers=headers)
        statuses[reply.status_code] += 1
        # An unknown parameter may be ignored by design (200); never a 5xx.
        if reply.status_code == 200 and label == "an unknown query parameter":
            continue
        if problem := _check_error_reply(f"GET {path[:60]} ({label})", reply):
            wrong.append(problem)
    print(f"\nhostile input: hostile paths and queries -> {dict(statuses)}")
    assert not wrong, "\n".join(wrong)


async def test_a_5_mib_http_body_is_413(gateway: Gateway) -> None:
    g = gateway
    headers = {**CLIENT_ADDRESS, "Authorization": f"Bearer {g.users['rooms'].token}"}
    big = json.dumps({"space": {"title": "x" * FIVE_MIB}}).encode()
    declared = await g.client.post("/v1/spaces", content=big, headers=headers)

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the gateway must count while it reads.
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    streamed = await g.client.post("/v1/spaces", content=chunks(), headers=headers)
    for reply in (declared, streamed):
        assert reply.status_code == 413, reply.text[:200]
        body = reply.json()
        assert body["code"] == Code.RESOURCE_EXHAUSTED.value[0]
        assert body["details"][0]["reason"] == "BODY_TOO_LARGE"


# -- SDP offers to MediaService.Negotiate ------------------------------------------------


@dataclass
class Sdp:
    """A listener of a live Space, and a good offer (a real aiortc one)."""

    api: Api
    listener: User
    space: str
    offer: str

    async def grant(self) -> tuple[str, str]:
        """A fresh media grant (joining again issues one) and the node it names."""
        joined = await self.api.ok(
            "RoomsService.JoinSpace", token=self.listener.token, name=f"spaces/{self.space}",
            request_id=str(uuid.uuid4()),
        )  # fmt: skip
        return joined.media_grant.token, f"mediaNodes/{joined.media_grant.endpoint.node}"

    async def negotiate(self, grant: str, node: str, offer: str) -> CallResult:
        return await self.api.call(
            "MediaService.Negotiate", token=self.listener.token, node=node, grant=grant,
            sdp_offer=offer,
        )  # fmt: skip


@pytest.fixture(scope="module")
async def sdp(stack: Stack) -> AsyncIterator[Sdp]:
    api = Api(stack)
    try:
        host, listener = await signup(api, "sdphost"), await signup(api, "sdplis")
        space = await create_live_space(api, host, "hostile sdp")
        yield Sdp(api, listener, space, await audio_offer())
    finally:
        await api.close()


def _sections(offer: str) -> tuple[str, list[str]]:
    """An offer's session part and its m-sections (each without the trailing CRLF)."""
    head, *rest = offer.split("\r\nm=")
    return head, ["m=" + section.rstrip("\r\n") for section in rest]


def _join(head: str, sections: list[str]) -> str:
    return "\r\n".join([head, *sections]) + "\r\n"


def _with_bundle(head: str, mids: list[str]) -> str:
    lines = [line for line in head.split("\r\n") if not line.startswith("a=group:BUNDLE")]
    return "\r\n".join([*lines, "a=group:BUNDLE " + " ".join(mids)])


def _mid(section: str) -> str:
    return next(line[6:] for line in section.split("\r\n") if line.startswith("a=mid:"))


def _without(offer: str, prefix: str) -> str:
    return "\r\n".join(line for line in offer.split("\r\n") if not line.startswith(prefix))


def _padded_to(text: str, size: int) -> str:
    """``text`` with attribute lines appended up to exactly ``size`` bytes."""
    line = "a=x-padding:" + "p" * 60 + "\r\n"
    text += line * ((size - len(text.encode()) - 100) // len(line))
    return text + "a=" + "p" * (size - len(text.encode()) - 4) + "\r\n"


def _many_lines(head: str, first: str, count: int) -> str:
    """A compact offer of ``count`` recvonly Opus m-lines, ICE and DTLS at session level."""
    transport = [
        line
        for line in first.split("\r\n")
        if line.startswith(("a=ice-ufrag", "a=ice-pwd", "a=fingerprint:sha-256", "a=setup"))
    ]
    lines = [
        f"m=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:{i}\r\na=recvonly\r\na=rtcp-mux\r\n"
        "a=rtpmap:96 opus/48000/2"
        for i in range(count)
    ]
    session = _with_bundle(head, [str(i) for i in range(count)])
    return "\r\n".join([session, *transport, *lines]) + "\r\n"


def hostile_offers(offer: str) -> dict[str, str]:
    """Offers media must refuse, built from a real aiortc offer (so only one thing is off)."""
    head, sections = _sections(offer)
    first, recv = sections[0], sections[1]
    mids = [_mid(s) for s in sections]
    video = first.replace("m=audio", "m=video", 1).replace("opus/48000/2", "VP8/90000")
    datachannel = "\r\n".join(
        [
            "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
            "c=IN IP4 0.0.0.0",
            "a=mid:dc",
            "a=sctp-port:5000",
            *[
                line
                for line in first.split("\r\n")
                if line.startswith(("a=ice-", "a=fingerprint", "a=setup"))
            ],
        ]
    )
    session_only = head + "\r\n"
    # The second slot names Opus 109 where the others use aiortc's 96.
    second_slot = re.sub(r"\b96\b", "109", sections[2])
    return {
        "no SDP at all": "hello",
        "v=0 then garbage": "v=0\r\n\x01\x02garbage\r\nm=\r\nm=audio\r\n",
        "v=0 then binary": "v=0" + bytes(range(1, 128)).decode(),
        "only LF line ends, nothing else": "v=0\n\n\n",
        "exactly 64 KiB, no audio": _padded_to(session_only, 65536),
        "64 KiB + 1 byte": _padded_to(session_only, 65537),
        "1 MiB": "v=0\r\n" + "a=x\r\n" * (HUGE // 5),
        "a video m-line": _join(_with_bundle(head, mids), [video, *sections[1:]]),
        "a data channel": _join(_with_bundle(head, [*mids, "dc"]), [*sections, datachannel]),
        "only a data channel": _join(_with_bundle(head, ["dc"]), [datachannel]),
        "only video": _join(_with_bundle(head, [mids[0]]), [video]),
        "no m-line": session_only,
        "no Opus": offer.replace("opus/48000/2", "speex/48000"),
        "65 m-lines": _many_lines(head, first, 65),
        "600 m-lines": _many_lines(head, first, 600),
        "slots on two Opus payload types": _join(head, [first, recv, second_slot, *sections[3:]]),
        "no ICE credentials": _without(offer, "a=ice-"),
        "no DTLS fingerprint": _without(offer, "a=fingerprint"),
        "no RTCP mux": _without(offer, "a=rtcp-mux"),
        "a port that is no number": re.sub(r"m=audio \d+ ", "m=audio nine ", offer, count=1),
        "a payload type past 255": re.sub(r"\b96\b", "99999999999999999999", offer),
        "a fingerprint without a value": re.sub(
            r"a=fingerprint:(\S+) \S+", r"a=fingerprint:\1", offer
        ),
        "an unknown a=setup": re.sub(r"a=setup:\w+", "a=setup:sideways", offer),
        "a huge a=mid": offer.replace(f"a=mid:{mids[0]}", "a=mid:" + "m" * 30_000, 1),
        "BUNDLE naming missing mids": offer.replace(
            "a=group:BUNDLE " + " ".join(mids), "a=group:BUNDLE nope"
        ),
    }


async def test_hostile_offers_are_refused_and_leave_the_grant_unspent(
    sdp: Sdp, stack: Stack
) -> None:
    g = sdp
    wrong: list[str] = []
    seen: dict[str, str] = {}
    for label, offer in hostile_offers(g.offer).items():
        grant, node = await g.grant()
        result = await g.negotiate(grant, node, offer)
        seen[label] = f"{result.code.name} {result.reason}".strip()
        if result.code != Code.INVALID_ARGUMENT or result.reason not in (
            "INVALID_SDP",
            "INVALID_ARGUMENT",
        ):
            wrong.append(f"{label}: {result.code.name} {result.reason} {result.details[:200]}")
            continue
        if not result.details:
            wrong.append(f"{label}: refused without saying why")
        # The refusal did not spend the grant: it still opens a session (then left).
        accepted = await g.negotiate(grant, node, g.offer)
        if not accepted.ok:
            wrong.append(f"{label}: refused, and the grant was spent ({accepted.reason})")
        else:
            await g.api.ok(
                "MediaService.LeaveSession", token=g.listener.token,
                session=accepted.response.session,
            )  # fmt: skip
    # Past the transport's limit the offer never reaches media's code.
    grant, node = await g.grant()
    five = await g.negotiate(grant, node, "v=0\r\n" + "a=x\r\n" * (FIVE_MIB // 5))
    seen["5 MiB"] = five.code.name
    if five.code != Code.RESOURCE_EXHAUSTED:
        wrong.append(f"5 MiB: {five.code.name} {five.details[:200]}")
    print(f"\nhostile input: {len(seen)} hostile offers -> {seen}")
    assert not wrong, "\n".join(wrong)
    stack.check_alive()


def _with_ice(offer: str, ufrag: str, password: str) -> str:
    """``offer`` with other ICE credentials (everything else, the fingerprint too, kept)."""
    changed = re.sub(r"a=ice-ufrag:\S*", lambda _: f"a=ice-ufrag:{ufrag}", offer)
    return re.sub(r"a=ice-pwd:\S*", lambda _: f"a=ice-pwd:{password}", changed)


def hostile_credentials(offer: str) -> dict[str, str]:
    """The session's own offer (same m-lines and fingerprint) with ICE credentials an ICE
    restart must refuse (RFC 8839: 4-256 ice-chars of ufrag, 22-256 of password)."""
    with_ice = functools.partial(_with_ice, offer)
    good_pwd = "p" * 24
    return {
        "an empty ufrag": with_ice("", good_pwd),
        "a 3-character ufrag": with_ice("abc", good_pwd),
        "a 10,000-character ufrag": with_ice("u" * 10_000, good_pwd),
        "a ufrag with the STUN separator": with_ice("ab:cd", good_pwd),
        "a non-ASCII ufrag": with_ice("ü" * 8, good_pwd),
        "a short password": with_ice("abcd", "short"),
        "a 10,000-character password": with_ice("abcd", "p" * 10_000),
        "a non-ASCII password": with_ice("abcd", "ü" * 24),
    }


async def test_hostile_restart_offers_are_refused_and_keep_the_session(sdp: Sdp) -> None:
    g = sdp
    grant, node = await g.grant()
    opened = await g.negotiate(grant, node, g.offer)
    assert opened.ok, f"{opened.code.name} {opened.reason}"
    session = opened.response.session
    offers = {
        **hostile_offers(g.offer),
        **hostile_credentials(g.offer),
        "5 MiB": "v=0\r\n" + "a=x\r\n" * (FIVE_MIB // 5),
    }
    wrong: list[str] = []
    seen: dict[str, str] = {}
    for label, offer in offers.items():
        result = await g.api.call(
            "MediaService.RestartIce", token=g.listener.token, session=session, sdp_offer=offer
        )
        seen[label] = f"{result.code.name} {result.reason}".strip()
        want = Code.RESOURCE_EXHAUSTED if label == "5 MiB" else Code.INVALID_ARGUMENT
        if result.code != want:
            wrong.append(f"{label}: {result.code.name} {result.reason} {result.details[:200]}")
        # The session outlives the refusal: end-of-candidates still finds it.
        alive = await g.api.call(
            "MediaService.AddIceCandidate", token=g.listener.token, session=session, candidate=""
        )
        if not alive.ok:
            wrong.append(f"{label}: the session is gone afterwards ({alive.code.name})")
            break
    # The control: the same offer with valid new credentials restarts ICE.
    valid = await g.api.call(
        "MediaService.RestartIce", token=g.listener.token, session=session,
        sdp_offer=_with_ice(g.offer, "fresh1", "p" * 24),
    )  # fmt: skip
    print(
        f"\nhostile input: {len(seen)} hostile ICE restarts -> {seen};"
        f" a valid one -> {valid.code.name}"
    )
    await g.api.call("MediaService.LeaveSession", token=g.listener.token, session=session)
    assert not wrong, "\n".join(wrong)
    assert valid.ok, f"a valid ICE restart failed: {valid.code.name} {valid.details}"


# -- nothing died ------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def log_marks(stack: Stack) -> dict[str, int]:
    """How far each service's log went before this module: it reads only its own part."""
    return {
        name: running.log_path.stat().st_size if running.log_path.exists() else 0
        for name, running in stack.services.items()
    }


def _failures_logged(stack: Stack, marks: dict[str, int]) -> list[str]:
    """Log entries at ERROR or above, or with a traceback, since ``marks``: what a handler
    or a background task (an outbox relay, a webhook sender) choked on without the caller
    seeing it as a status."""
    found = []
    for name, running in stack.services.items():
        with running.log_path.open("rb") as log:
            log.seek(marks.get(name, 0))
            for raw in log:
                with contextlib.suppress(ValueError):
                    entry = json.loads(raw)
                    if entry.get("level") in ("ERROR", "CRITICAL") or "exception" in entry:
                        found.append(f"{name}: {entry.get('message', '')[:300]}")
    return found


async def test_every_process_survived_and_serves(stack: Stack, log_marks: dict[str, int]) -> None:
    stack.check_alive()
    not_serving = []
    for name, running in stack.services.items():
        if running.grpc_port:
            async with _channel(running.grpc_port) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5
                )
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    not_serving.append(name)
        elif running.http_port:
            async with httpx.AsyncClient() as client:
                reply_http = await client.get(f"http://127.0.0.1:{running.http_port}/healthz")
                if reply_http.status_code != 200:
                    not_serving.append(name)
    assert not not_serving, f"not serving after the hostile input: {not_serving}"
    logged = _failures_logged(stack, log_marks)
    print(f"\nhostile input: {len(logged)} errors logged by the services meanwhile")
    assert not logged, "\n".join(logged[:20])
