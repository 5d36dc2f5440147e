"""The shared runtime against a real gRPC server: health, reflection, metrics, auth,
validation, error mapping, streaming, deadlines and request ids."""

from __future__ import annotations

import asyncio
import gc
import re
import urllib.request
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from spaces.testing.v1 import testing_service_pb2 as pb
from spaces.testing.v1 import testing_service_pb2_grpc as pb_grpc

from services.common.auth import ServiceTokenIssuer
from services.common.clients import create_channel
from services.common.server import Service
from services.common.settings import CommonSettings
from services.common.telemetry import setup_tracing
from tests.helpers.servers import SERVICE_NAME, bearer, plain_channel, running_testing_service
from tests.helpers.testing_servicer import EXPLOSION_DETAIL
from tests.helpers.tokens import (
    TEST_INTERNAL_SECRET,
    SigningKey,
    hs256_with_public_key,
    unsigned_token,
)


@pytest.fixture(scope="module")
async def service(signing_key: SigningKey) -> AsyncIterator[Service]:
    # One server for the module: these tests only read state it keeps per call.
    async with running_testing_service(signing_key, metrics=True) as running:
        yield running


@pytest.fixture(scope="module")
async def stub(service: Service) -> AsyncIterator[pb_grpc.TestingServiceStub]:
    async with plain_channel(service.port) as channel:
        yield pb_grpc.TestingServiceStub(channel)


@pytest.fixture
def user_token(signing_key: SigningKey) -> str:
    return signing_key.mint("alice")


@pytest.fixture
def service_token() -> str:
    return ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET).token()


def details(error: grpc.aio.AioRpcError) -> dict[str, object]:
    """Decode the google.rpc details of a failed call by their type."""
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    found: dict[str, object] = {}
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.QuotaFailure,
    ):
        for detail in status.details:
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


# --- health, reflection, metrics ---------------------------------------------------------


async def test_health_serving_for_server_and_each_service(service: Service) -> None:
    async with plain_channel(service.port) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(service: Service) -> None:
    async with plain_channel(service.port) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        replies = [reply async for reply in call]
        names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


async def test_metrics_count_and_time_calls(
    service: Service, stub: pb_grpc.TestingServiceStub
) -> None:
    await stub.Ping(pb.PingRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Fail(pb.FailRequest(kind="not_found"))
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
    labels = f'grpc_service="{SERVICE_NAME}"'
    assert re.search(
        rf'spaces_rpc_server_handled_total\{{(?=[^}}]*{labels})(?=[^}}]*method="Ping")'
        rf'(?=[^}}]*code="OK")[^}}]*\}} [1-9]',
        text,
    )
    assert re.search(
        r'spaces_rpc_server_handled_total\{(?=[^}]*method="Fail")(?=[^}]*code="NOT_FOUND")',
        text,
    )
    assert re.search(
        rf'spaces_rpc_server_duration_seconds_bucket\{{(?=[^}}]*{labels})(?=[^}}]*method="Ping")',
        text,
    )
    assert re.search(r'spaces_rpc_server_duration_seconds_count\{[^}]*method="Ping"', text)


async def test_metrics_time_garbage_collections(service: Service) -> None:
    """Every collection holds the GIL; operators see how long (media: forwarding stops)."""
    gc.collect()
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
    match = re.search(r'spaces_gc_pause_seconds_count\{generation="2"\} ([0-9.e+]+)', text)
    assert match and float(match.group(1)) >= 1


# --- authentication ----------------------------------------------------------------------


async def test_public_rpc_needs_no_token(stub: pb_grpc.TestingServiceStub) -> None:
    assert (await stub.Ping(pb.PingRequest())).message == "pong"


async def test_user_rpc_accepts_user_token(
    stub: pb_grpc.TestingServiceStub, user_token: str
) -> None:
    reply = await stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(user_token))
    assert (reply.kind, reply.subject) == ("user", "alice")


async def test_user_rpc_accepts_service_token(
    stub: pb_grpc.TestingServiceStub, service_token: str
) -> None:
    reply = await stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(service_token))
    assert (reply.kind, reply.subject) == ("service", "rooms")


async def test_es256_user_tokens_are_accepted_too() -> None:
    key = SigningKey.es256()
    async with running_testing_service(key) as running, plain_channel(running.port) as channel:
        reply = await pb_grpc.TestingServiceStub(channel).WhoAmI(
            pb.WhoAmIRequest(), metadata=bearer(key.mint("bob"))
        )
    assert reply.subject == "bob"


async def test_missing_token_is_unauthenticated(stub: pb_grpc.TestingServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.WhoAmI(pb.WhoAmIRequest())
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(failure.value)["ErrorInfo"].reason == "UNAUTHENTICATED"  # type: ignore[attr-defined]


def bad_tokens(key: SigningKey) -> dict[str, str]:
    other = SigningKey.ed25519(kid=key.kid)  # same kid, different key: a forgery
    return {
        "forged": other.mint("alice"),
        "expired": key.mint("alice", ttl_s=-120),
        "alg_none": unsigned_token("alice", kid=key.kid),
        "wrong_audience": key.mint("alice", aud="someone-else"),
        "wrong_issuer": key.mint("alice", iss="evil"),
        "unknown_kid": key.mint("alice", kid="nope"),
        "hs256_with_public_key": hs256_with_public_key(key),
        "service_token_other_secret": ServiceTokenIssuer("rooms", "x" * 40).token(),
        "garbage": "not-a-jwt",
    }


@pytest.mark.parametrize(
    "kind",
    [
        "forged",
        "expired",
        "alg_none",
        "wrong_audience",
        "wrong_issuer",
        "unknown_kid",
        "hs256_with_public_key",
        "service_token_other_secret",
        "garbage",
    ],
)
@pytest.mark.parametrize("method", ["WhoAmI", "Ping"])
async def test_bad_tokens_are_unauthenticated_even_on_public_rpcs(
    stub: pb_grpc.TestingServiceStub, signing_key: SigningKey, kind: str, method: str
) -> None:
    token = bad_tokens(signing_key)[kind]
    request = pb.WhoAmIRequest() if method == "WhoAmI" else pb.PingRequest()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await getattr(stub, method)(request, metadata=bearer(token))
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reason = details(failure.value)["ErrorInfo"].reason  # type: ignore[attr-defined]
    assert reason == ("TOKEN_EXPIRED" if kind == "expired" else "INVALID_TOKEN")


async def test_malformed_authorization_header(stub: pb_grpc.TestingServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Ping(pb.PingRequest(), metadata=(("authorization", "Basic abc"),))
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_internal_rpc(
    stub: pb_grpc.TestingServiceStub, user_token: str, service_token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.InternalWhoAmI(pb.InternalWhoAmIRequest())
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.InternalWhoAmI(pb.InternalWhoAmIRequest(), metadata=bearer(user_token))
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details(failure.value)["ErrorInfo"].reason == "INTERNAL_ONLY"  # type: ignore[attr-defined]

    reply = await stub.InternalWhoAmI(pb.InternalWhoAmIRequest(), metadata=bearer(service_token))
    assert (reply.caller.kind, reply.caller.subject) == ("service", "rooms")


# --- validation and errors ---------------------------------------------------------------


async def test_invalid_request_gets_bad_request_field_violations(
    stub: pb_grpc.TestingServiceStub,
) -> None:
    request = pb.CreateThingRequest(thing=pb.Thing(handle="No Way!", size=0, tags=["ok", ""]))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.CreateThing(request)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = details(failure.value)
    info = found["ErrorInfo"]
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "spaces.testing")  # type: ignore[attr-defined]
    violations = {v.field: v.description for v in found["BadRequest"].field_violations}  # type: ignore[attr-defined]
    assert set(violations) == {"thing.handle", "thing.size", "thing.tags[1]"}
    assert "regex" in violations["thing.handle"]


async def test_missing_required_message(stub: pb_grpc.TestingServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.CreateThing(pb.CreateThingRequest())
    violations = details(failure.value)["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert [v.field for v in violations] == ["thing"]


async def test_valid_request_passes(stub: pb_grpc.TestingServiceStub) -> None:
    thing = pb.Thing(handle="good_one", size=3, tags=["a"])
    assert (await stub.CreateThing(pb.CreateThingRequest(thing=thing))).thing == thing


async def test_unexpected_exception_is_internal_without_its_message(
    stub: pb_grpc.TestingServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Explode(pb.ExplodeRequest(), metadata=(("x-request-id", "boom-1"),))
    error = failure.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (error.details() or "")
    assert "hunter2" not in str(error.trailing_metadata())
    info = details(error)["ErrorInfo"]
    assert info.reason == "INTERNAL"  # type: ignore[attr-defined]
    assert info.metadata["request_id"] == "boom-1"  # type: ignore[attr-defined]
    # The traceback is logged, for operators.
    assert any(r.exc_info and EXPLOSION_DETAIL in str(r.exc_info[1]) for r in caplog.records)


async def test_service_error_carries_its_details(stub: pb_grpc.TestingServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Fail(pb.FailRequest(kind="resource_exhausted"))
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(failure.value)
    assert found["ErrorInfo"].reason == "REACTION_RATE_LIMITED"  # type: ignore[attr-defined]
    assert found["RetryInfo"].retry_delay.ToMilliseconds() == 1500  # type: ignore[attr-defined]
    assert found["QuotaFailure"].violations[0].subject == "user"  # type: ignore[attr-defined]

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Fail(pb.FailRequest(kind="not_found"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert failure.value.details() == "space not found"
    assert details(failure.value)["ErrorInfo"].reason == "SPACE_NOT_FOUND"  # type: ignore[attr-defined]


# --- streaming ---------------------------------------------------------------------------


async def test_server_streaming(stub: pb_grpc.TestingServiceStub, user_token: str) -> None:
    call = stub.Count(pb.CountRequest(n=5), metadata=bearer(user_token))
    assert [r.value async for r in call] == [1, 2, 3, 4, 5]


async def test_server_streaming_is_authenticated_and_validated(
    stub: pb_grpc.TestingServiceStub, user_token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        [r async for r in stub.Count(pb.CountRequest(n=5))]
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        [r async for r in stub.Count(pb.CountRequest(n=0), metadata=bearer(user_token))]
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_error_part_way_through_a_stream(
    stub: pb_grpc.TestingServiceStub, user_token: str
) -> None:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for reply in stub.Count(
            pb.CountRequest(n=5, fail_after=2), metadata=bearer(user_token)
        ):
            received.append(reply.value)
    assert received == [1, 2]
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(failure.value)["ErrorInfo"].reason == "NUMBER_NOT_FOUND"  # type: ignore[attr-defined]


# --- request ids, deadlines and identity across hops -------------------------------------


async def test_request_id_is_kept_or_made(
    stub: pb_grpc.TestingServiceStub, user_token: str
) -> None:
    given = await stub.WhoAmI(
        pb.WhoAmIRequest(), metadata=(*bearer(user_token), ("x-request-id", "req-42"))
    )
    assert given.request_id == "req-42"
    made = await stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(user_token))
    assert re.fullmatch(r"[0-9a-f]{32}", made.request_id)
    hostile = await stub.WhoAmI(
        pb.WhoAmIRequest(), metadata=(*bearer(user_token), ("x-request-id", "no spaces; " * 20))
    )
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.request_id)


async def test_deadline_request_id_and_identity_propagate_through_a_client(
    signing_key: SigningKey, user_token: str
) -> None:
    async with (
        running_testing_service(signing_key, name="front") as front,
        running_testing_service(signing_key, name="back") as back,
        plain_channel(front.port) as channel,
    ):
        stub = pb_grpc.TestingServiceStub(channel)
        target = f"127.0.0.1:{back.port}"
        metadata = (*bearer(user_token), ("x-request-id", "chain-1"))

        as_service = await stub.Relay(
            pb.RelayRequest(target=target), metadata=metadata, timeout=2.0
        )
        seen = as_service.downstream
        assert (seen.kind, seen.subject, seen.request_id) == ("service", "front", "chain-1")
        # The downstream deadline is what was left of the 2 s, not the client's 30 s default.
        # gRPC rounds the grpc-timeout it sends up to its wire unit, and the back end starts
        # its clock on arrival, so what was left can read a few milliseconds over 2 s.
        assert 0 < seen.time_remaining_s <= 2.1

        forwarded = await stub.Relay(
            pb.RelayRequest(target=target, forward_user=True), metadata=metadata, timeout=2.0
        )
        assert (forwarded.downstream.kind, forwarded.downstream.subject) == ("user", "alice")

        internal = await stub.Relay(
            pb.RelayRequest(target=target, internal=True), metadata=metadata, timeout=2.0
        )
        assert internal.downstream.kind == "service"

        no_deadline = await stub.Relay(pb.RelayRequest(target=target), metadata=metadata)
        # gRPC rounds the timeout it sends up to its wire unit: allow a little over 30 s.
        assert 29 < no_deadline.downstream.time_remaining_s <= 30.5


async def test_traces_follow_calls_across_services(
    signing_key: SigningKey, user_token: str
) -> None:
    # Spans are made (never exported: no OTLP endpoint) once the process sets up tracing.
    setup_tracing("testing", CommonSettings())
    async with (
        running_testing_service(signing_key, name="front") as front,
        running_testing_service(signing_key, name="back") as back,
        plain_channel(front.port) as channel,
    ):
        stub = pb_grpc.TestingServiceStub(channel)
        direct = await stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(user_token))
        assert re.fullmatch(r"[0-9a-f]{32}", direct.trace_id)
        relayed = await stub.Relay(
            pb.RelayRequest(target=f"127.0.0.1:{back.port}"), metadata=bearer(user_token)
        )
        # The downstream server continued the relaying call's trace.
        assert relayed.trace_id not in ("", direct.trace_id)
        assert relayed.downstream.trace_id == relayed.trace_id


async def test_only_listed_methods_are_retried_on_unavailable(service: Service) -> None:
    target = f"127.0.0.1:{service.port}"
    retried = create_channel(target, idempotent_methods=["spaces.testing.v1.TestingService/Fail"])
    not_retried = create_channel(
        target, idempotent_methods=["spaces.testing.v1.TestingService/Ping"]
    )
    async with retried, not_retried:
        await pb_grpc.TestingServiceStub(retried).Fail(pb.FailRequest(kind="flaky:a"))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await pb_grpc.TestingServiceStub(not_retried).Fail(pb.FailRequest(kind="flaky:b"))
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_calls_wait_for_start_up_hooks(signing_key: SigningKey) -> None:
    release = asyncio.Event()

    async def slow_start() -> None:
        await release.wait()

    service_ready = asyncio.Event()

    async def start() -> None:
        await service.start()
        service_ready.set()

    from tests.helpers.servers import build_testing_service

    service = build_testing_service(signing_key, startup=[slow_start])
    starting = asyncio.create_task(start())
    try:
        while service.port == 0:
            await asyncio.sleep(0.01)
        async with plain_channel(service.port) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await pb_grpc.TestingServiceStub(channel).Ping(pb.PingRequest())
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            assert details(failure.value)["ErrorInfo"].reason == "STARTING"  # type: ignore[attr-defined]
            release.set()
            await asyncio.wait_for(service_ready.wait(), 5)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert (
                await pb_grpc.TestingServiceStub(channel).Ping(pb.PingRequest())
            ).message == "pong"
    finally:
        release.set()
        await starting
        await service.stop(grace=0)


async def test_channel_token_reaches_every_call_kind(signing_key: SigningKey) -> None:
    """Unary and server-streaming calls both carry the service token the channel adds."""
    async with running_testing_service(signing_key) as service:
        issuer = ServiceTokenIssuer("rooms", TEST_INTERNAL_SECRET)
        async with create_channel(f"127.0.0.1:{service.port}", token_issuer=issuer) as channel:
            stub = pb_grpc.TestingServiceStub(channel)
            who = await stub.InternalWhoAmI(pb.InternalWhoAmIRequest())
            assert (who.caller.kind, who.caller.subject) == ("service", "rooms")
            values = [reply.value async for reply in stub.Count(pb.CountRequest(n=3))]
            assert values == [1, 2, 3]


async def test_clients_reconnect_after_the_max_connection_age_without_losing_calls(
    signing_key: SigningKey,
) -> None:
    # Reconnecting is what makes a client resolve the service's name again (new replicas
    # behind a headless Service get calls); a call in flight must finish meanwhile.
    async with (
        running_testing_service(signing_key, max_connection_age_s=0.3) as service,
        plain_channel(service.port) as channel,
    ):
        stub = pb_grpc.TestingServiceStub(channel)
        long_call = asyncio.ensure_future(stub.Sleep(pb.SleepRequest(seconds=1.5)))
        peers = set()
        for _ in range(12):
            peers.add((await stub.Sleep(pb.SleepRequest(seconds=0))).peer)
            await asyncio.sleep(0.15)
        first_peer = (await long_call).peer
        assert len(peers) >= 2, "the client kept one connection past the age"
        assert first_peer in peers, "the long call finished on its first connection"
