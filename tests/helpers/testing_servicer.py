"""The servicer of spaces.testing.v1.TestingService: small behaviours the runtime tests poke."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry import trace
from spaces.testing.v1 import testing_service_pb2 as pb
from spaces.testing.v1 import testing_service_pb2_grpc as pb_grpc

from services.common import context, errors
from services.common.auth import ServiceTokenIssuer
from services.common.clients import CallIdentity, create_channel

EXPLOSION_DETAIL = "kaboom: db password is hunter2"


def describe_call() -> pb.WhoAmIResponse:
    principal = context.optional_principal()
    remaining = context.time_remaining()
    span = trace.get_current_span().get_span_context()
    return pb.WhoAmIResponse(
        trace_id=format(span.trace_id, "032x") if span.is_valid else "",
        kind=principal.kind.value if principal else "",
        subject=(principal.user_id or principal.service_name or "") if principal else "",
        request_id=context.current_request_id() or "",
        time_remaining_s=-1.0 if remaining is None else remaining,
    )


class TestingServicer(pb_grpc.TestingServiceServicer):
    """Implements TestingService.

    :param token_issuer: used by Relay to call the other server as this service.
    """

    def __init__(self, token_issuer: ServiceTokenIssuer | None = None) -> None:
        self._issuer = token_issuer
        self._flaky_seen: set[str] = set()

    async def Ping(self, request: pb.PingRequest, context_: Any) -> pb.PingResponse:
        return pb.PingResponse(message="pong")

    async def WhoAmI(self, request: pb.WhoAmIRequest, context_: Any) -> pb.WhoAmIResponse:
        return describe_call()

    async def InternalWhoAmI(
        self, request: pb.InternalWhoAmIRequest, context_: Any
    ) -> pb.InternalWhoAmIResponse:
        return pb.InternalWhoAmIResponse(caller=describe_call())

    async def Count(
        self, request: pb.CountRequest, context_: Any
    ) -> AsyncIterator[pb.CountResponse]:
        for value in range(1, request.n + 1):
            if request.fail_after and value > request.fail_after:
                raise errors.NotFound("no more numbers", reason="NUMBER_NOT_FOUND")
            yield pb.CountResponse(value=value)
            await asyncio.sleep(0)

    async def CreateThing(
        self, request: pb.CreateThingRequest, context_: Any
    ) -> pb.CreateThingResponse:
        return pb.CreateThingResponse(thing=request.thing)

    async def Explode(self, request: pb.ExplodeRequest, context_: Any) -> pb.ExplodeResponse:
        raise RuntimeError(EXPLOSION_DETAIL)

    async def Fail(self, request: pb.FailRequest, context_: Any) -> pb.FailResponse:
        if request.kind == "not_found":
            raise errors.NotFound("space not found", reason="SPACE_NOT_FOUND")
        if request.kind == "resource_exhausted":
            raise errors.ResourceExhausted(
                "too many reactions",
                reason="REACTION_RATE_LIMITED",
                quota_subject="user",
                quota_description="5 reactions per second",
                retry_after=1.5,
            )
        if request.kind.startswith("flaky:"):
            # UNAVAILABLE the first time a key is seen, fine afterwards.
            if request.kind not in self._flaky_seen:
                self._flaky_seen.add(request.kind)
                raise errors.Unavailable("warming up")
            return pb.FailResponse()
        if request.kind == "invalid_argument":
            raise errors.InvalidArgument(
                "bad title", field_violations=[("space.title", "must not be empty")]
            )
        raise errors.Unavailable("try later", retry_after=2)

    async def Relay(self, request: pb.RelayRequest, context_: Any) -> pb.RelayResponse:
        identity = CallIdentity.FORWARD_USER if request.forward_user else CallIdentity.SERVICE
        channel = create_channel(
            request.target,
            idempotent_methods=["spaces.testing.v1.TestingService/WhoAmI"],
            token_issuer=self._issuer,
            identity=identity,
            default_timeout_s=30.0,
        )
        async with channel:
            stub = pb_grpc.TestingServiceStub(channel)
            here = describe_call().trace_id
            if request.internal:
                internal = await stub.InternalWhoAmI(pb.InternalWhoAmIRequest())
                return pb.RelayResponse(downstream=internal.caller, trace_id=here)
            downstream = await stub.WhoAmI(pb.WhoAmIRequest())
            return pb.RelayResponse(downstream=downstream, trace_id=here)

    async def Sleep(self, request: pb.SleepRequest, context_: Any) -> pb.SleepResponse:
        await asyncio.sleep(request.seconds)
        return pb.SleepResponse(peer=context_.peer())
