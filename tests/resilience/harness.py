"""The real stack for the resilience and security scenarios, and clients to drive it.

* :func:`running_stack` starts :class:`tools.devstack.Stack`: the processes ``make up``
  starts, on free ports, with their own embedded PostgreSQL and Valkey.
* :class:`Api` calls every service straight over gRPC, as the gateway does; tokens are
  passed per call.
* :func:`signup` creates real accounts through identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from spaces.identity.v1 import identity_resources_pb2 as identity_res
from spaces.identity.v1 import identity_service_pb2 as identity_pb
from spaces.media.v1 import media_service_pb2 as media_pb
from spaces.notify.v1 import notify_service_pb2 as notify_pb
from spaces.payments.v1 import payments_service_pb2 as payments_pb
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_res
from spaces.rooms.v1 import rooms_service_pb2 as rooms_pb

from tools.devstack import Stack

__all__ = [
    "Api",
    "CallResult",
    "User",
    "Watcher",
    "percentile",
    "running_stack",
    "signup",
    "wait_until",
]


# Importing the service modules registers every package in the default descriptor pool.
_PACKAGES = {
    "identity": identity_pb,
    "rooms": rooms_pb,
    "notify": notify_pb,
    "payments": payments_pb,
    "media": media_pb,
}

#: Argon2 at its floor: sign-ups cost milliseconds, for scenarios that need many accounts.
FAST_PASSWORDS = {"IDENTITY_PASSWORD_MEMORY_KIB": "8", "IDENTITY_PASSWORD_TIME_COST": "1"}


@contextlib.contextmanager
def running_stack(
    run_dir: Path,
    *,
    only: tuple[str, ...] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """Start the stack on free ports in ``run_dir``; stop it afterwards."""
    stack = Stack(run_dir, auto_ports=True, only=only, extra_env=extra_env)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@dataclass(frozen=True)
class CallResult:
    """How one call ended: OK with a response, or a status with its ErrorInfo reason."""

    code: grpc.StatusCode
    reason: str = ""
    response: Any = None
    retry_after_s: float | None = None
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


def _result_of(error: grpc.aio.AioRpcError) -> CallResult:
    reason = ""
    retry: float | None = None
    status: status_pb2.Status | None = None
    with contextlib.suppress(Exception):
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry = retry_info.retry_delay.ToTimedelta().total_seconds()
    return CallResult(error.code(), reason, None, retry, error.details() or "")


class Api:
    """Straight gRPC to the services of a running stack, by method name.

    :param stack: the running stack.
    """

    def __init__(self, stack: Stack) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        for name, running in stack.services.items():
            if running.grpc_port:
                self._channels[name] = grpc.aio.insecure_channel(
                    f"127.0.0.1:{running.grpc_port}",
                    options=[
                        ("grpc.max_send_message_length", 64 * 1024 * 1024),
                        # Reconnect quickly after a restart, as a mobile app retrying would.
                        ("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 500),
                    ],
                )

    @staticmethod
    def method(full_name: str) -> MethodDescriptor:
        """``spaces.rooms.v1.RoomsService.JoinSpace`` or ``RoomsService.JoinSpace``."""
        if full_name.count(".") == 1:
            service = full_name.split(".")[0]
            package = service.removesuffix("Service").lower()
            full_name = f"spaces.{package}.v1.{full_name}"
        return descriptor_pool.Default().FindMethodByName(full_name)

    @staticmethod
    def request(method: MethodDescriptor, **fields: Any) -> Message:
        """A request message of ``method`` with ``fields`` set."""
        cls: Any = GetMessageClass(method.input_type)
        message: Message = cls(**fields)
        return message

    def channel(self, method: MethodDescriptor) -> grpc.aio.Channel:
        package = method.containing_service.full_name.split(".")[1]
        return self._channels[package]

    async def call(
        self,
        method: MethodDescriptor | str,
        request: Message | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        metadata: Sequence[tuple[str, str]] = (),
        **fields: Any,
    ) -> CallResult:
        """Call a unary method (or read the first message of a stream); never raises."""
        if isinstance(method, str):
            method = self.method(method)
        if request is None:
            request = self.request(method, **fields)
        path = f"/{method.containing_service.full_name}/{method.name}"
        response_cls: Any = GetMessageClass(method.output_type)
        md = list(metadata)
        if token is not None:
            md.append(("authorization", f"Bearer {token}"))
        channel = self.channel(method)
        try:
            if method.server_streaming:
                stream = channel.unary_stream(
                    path,
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=response_cls.FromString,
                )(request, timeout=timeout, metadata=md)
                first = None
                async for message in stream:
                    first = message
                    break
                stream.cancel()
                return CallResult(grpc.StatusCode.OK, response=first)
            response = await channel.unary_unary(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_cls.FromString,
            )(request, timeout=timeout, metadata=md)
            return CallResult(grpc.StatusCode.OK, response=response)
        except grpc.aio.AioRpcError as error:
            return _result_of(error)

    async def ok(self, method: str, token: str | None = None, **fields: Any) -> Any:
        """Call and return the response; fail the test on any error."""
        result = await self.call(method, token=token, **fields)
        assert result.ok, f"{method} failed: {result.code.name} {result.reason} {result.details}"
        return result.response

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)


@dataclass(frozen=True)
class User:
    """A signed-up account and its tokens."""

    id: str
    handle: str
    token: str
    refresh_token: str
    password: str

    @property
    def name(self) -> str:
        return f"users/{self.id}"


async def signup(api: Api, prefix: str = "u") -> User:
    """Create an account through identity.CreateUser; return it with its tokens."""
    handle = f"{prefix[:6]}_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    response = await api.ok(
        "IdentityService.CreateUser",
        user=identity_res.User(handle=handle, display_name=handle),
        password=password,
        request_id=str(uuid.uuid4()),
    )
    return User(
        response.user.id,
        handle,
        response.tokens.access_token,
        response.tokens.refresh_token,
        password,
    )


async def create_live_space(api: Api, host: User, title: str = "resilience") -> str:
    """The host opens a live Space (visible to everyone); return its id."""
    response = await api.ok(
        "RoomsService.CreateSpace",
        token=host.token,
        space=rooms_res.Space(title=title),
        request_id=str(uuid.uuid4()),
    )
    return str(response.space.name.split("/")[1])


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1
) -> float:
    """Poll ``predicate`` until it holds; return the seconds it took."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout:.0f} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


@contextlib.asynccontextmanager
async def api_of(stack: Stack) -> AsyncIterator[Api]:
    api = Api(stack)
    try:
        yield api
    finally:
        await api.close()


class Watcher:
    """Watches a Space as an app does: on a broken stream it watches again with the last
    resume_token, until stopped.

    :ivar events: every event received, in order.
    :ivar snapshots: how many streams started with a snapshot (no resume possible).
    :ivar breaks: how many times the stream broke, with the codes.
    """

    def __init__(self, api: Api, token: str, space: str) -> None:
        self._api = api
        self._token = token
        self._space = space
        self.events: list[Any] = []
        self.snapshots = 0
        self.breaks: list[grpc.StatusCode] = []
        self.resumed_at: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._resume_token = ""

    def start(self) -> Watcher:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def last_seq(self) -> int:
        return int(self.events[-1].sequence) if self.events else 0

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        """Wait until an event matching ``predicate`` arrived; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if predicate(event):
                    return event
            await asyncio.sleep(0.05)
        raise AssertionError(f"the watcher never saw the event (last seq {self.last_seq})")

    async def _run(self) -> None:
        method = Api.method("RoomsService.WatchSpace")
        response_cls: Any = GetMessageClass(method.output_type)
        channel = self._api.channel(method)
        while True:
            call = channel.unary_stream(
                "/spaces.rooms.v1.RoomsService/WatchSpace",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_cls.FromString,
            )(
                Api.request(method, name=f"spaces/{self._space}", resume_token=self._resume_token),
                metadata=[("authorization", f"Bearer {self._token}")],
            )
            first = True
            try:
                async for response in call:
                    for event in response.events:
                        if first:
                            if event.WhichOneof("event") == "snapshot":
                                self.snapshots += 1
                            if self._resume_token:
                                self.resumed_at.append(time.monotonic())
                            first = False
                        self.events.append(event)
                        self._resume_token = event.resume_token
                return  # the stream ended: the Space is over
            except grpc.aio.AioRpcError as error:
                self.breaks.append(error.code())
                await asyncio.sleep(0.1)


async def eventually_ok(
    api: Api, method: str, token: str | None = None, timeout: float = 10.0, **fields: Any
) -> Any:
    """Call until it succeeds: for reads of what another service learns from events."""
    deadline = time.monotonic() + timeout
    while True:
        result = await api.call(method, token=token, **fields)
        if result.ok:
            return result.response
        if time.monotonic() > deadline:
            raise AssertionError(f"{method} still failing: {result.code.name} {result.reason}")
        await asyncio.sleep(0.1)


class LoopThread:
    """An asyncio loop on a thread of its own, for servers that must answer while the test's
    loop is blocked (starting processes, waiting on them)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@dataclass(frozen=True)
class ProxiedCall:
    """One call that went through a :class:`FaultProxy`."""

    method: str
    request_id: str
    remaining_s: float | None
    at: float
    failed: bool


class FaultProxy:
    """A transparent gRPC proxy in front of one service, recording every call and able to
    fail some with UNAVAILABLE: a real network hop between two real processes.

    Point callers at it with the service's ``SPACES_<NAME>_ADDR``, then set :attr:`backend`
    once the stack knows the service's port. Bytes pass through unparsed; the deadline
    forwarded is what is left of the caller's.
    """

    def __init__(self, loops: LoopThread) -> None:
        self._loops = loops
        self.backend = ""
        self.calls: list[ProxiedCall] = []
        self.fail_every = 0  # 2: every second call fails
        self.fail_methods: tuple[str, ...] = ()  # prefixes of the methods that may fail
        self._counter = 0
        self._channel: grpc.aio.Channel | None = None
        self._channel_target = ""
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def start(self) -> int:
        self.port = int(self._loops.run(self._start()))
        return self.port

    async def _start(self) -> int:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([_ProxyHandler(self)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return port

    def stop(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                await self._server.stop(0)
            if self._channel is not None:
                await self._channel.close(None)

        self._loops.run(stop())

    def _backend_channel(self) -> grpc.aio.Channel:
        if self._channel is None or self._channel_target != self.backend:
            self._channel = grpc.aio.insecure_channel(self.backend)
            self._channel_target = self.backend
        return self._channel

    def _admit(self, method: str, metadata: Mapping[str, str], remaining: float | None) -> bool:
        """Record the call; return whether it is to fail."""
        self._counter += 1
        failing = (
            self.fail_every > 0
            and method.startswith(self.fail_methods)
            and self._counter % self.fail_every == 0
        )
        self.calls.append(
            ProxiedCall(
                method, metadata.get("x-request-id", ""), remaining, time.monotonic(), failing
            )
        )
        return failing

    def of(self, prefix: str) -> list[ProxiedCall]:
        return [c for c in self.calls if c.method.startswith(prefix)]


def _forwarded_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key.startswith((":", "grpc-")) or key in ("user-agent", "te", "content-type"):
            continue
        if isinstance(value, str):
            found[key] = value
    return found


class _ProxyHandler(grpc.GenericRpcHandler):
    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        qualified = method.lstrip("/").replace("/", ".")
        try:
            streaming = descriptor_pool.Default().FindMethodByName(qualified).server_streaming
        except KeyError:
            streaming = False
        proxy = self._proxy

        async def begin(context: Any) -> tuple[dict[str, str], float | None] | None:
            metadata = _forwarded_metadata(context)
            remaining = context.time_remaining()
            if proxy._admit(method, metadata, remaining):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected by the fault proxy")
                return None
            if not proxy.backend:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "backend not known yet")
                return None
            return metadata, remaining

        async def unary(request: bytes, context: Any) -> bytes:
            started = await begin(context)
            assert started is not None
            metadata, remaining = started
            try:
                response: bytes = await proxy._backend_channel().unary_unary(method)(
                    request, timeout=remaining, metadata=list(metadata.items())
                )
                return response
            except grpc.aio.AioRpcError as error:
                await context.abort(
                    error.code(), error.details() or "", tuple(error.trailing_metadata() or ())
                )
                raise

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            started = await begin(context)
            assert started is not None
            metadata, remaining = started
            call = proxy._backend_channel().unary_stream(method)(
                request, timeout=remaining, metadata=list(metadata.items())
            )
            try:
                async for message in call:
                    yield message
            except grpc.aio.AioRpcError as error:
                await context.abort(
                    error.code(), error.details() or "", tuple(error.trailing_metadata() or ())
                )

        if streaming:
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes


class RawHttpConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams.

    For floods of thousands of requests: httpx's pool rescans its queue on every change and
    stalls with thousands of waiters, which would measure the client instead of the server.
    """

    def __init__(self, port: int) -> None:
        self._port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> HttpReply:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self._port)
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self._port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines += [f"Content-Length: {len(body)}", "", ""]
        self._writer.write("\r\n".join(lines).encode() + body)
        await self._writer.drain()
        status_line = await self._reader.readline()
        status = int(status_line.split()[1])
        found: dict[str, str] = {}
        while True:
            line = (await self._reader.readline()).decode().strip()
            if not line:
                break
            key, _, value = line.partition(":")
            found[key.strip().lower()] = value.strip()
        data = await self._reader.readexactly(int(found.get("content-length", "0")))
        if found.get("connection", "").lower() == "close":
            await self.close()
        return HttpReply(status, found, data)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None
