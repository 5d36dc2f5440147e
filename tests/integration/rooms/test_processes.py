"""Two rooms *processes* (``python -m services.rooms.main``, started by ``tools/devstack.py``'s
``Stack``) serving the same Space: every watcher gets the same sequence, and a watcher whose
process is stopped resumes on the other one without missing anything.

Identity runs in-process (its JWKS is what the rooms processes verify tokens with); media
and payments are the test doubles (media has no process in this test).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from spaces.rooms.v1 import rooms_events_pb2 as ev
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb
from spaces.rooms.v1 import rooms_service_pb2_grpc as pb_grpc

from tests.helpers.rooms_doubles import (
    RecordingMediaControl,
    TicketBook,
    running_media,
    running_payments,
)
from tests.helpers.tokens import TEST_INTERNAL_SECRET
from tests.integration.identity.harness import Identity, running_identity
from tests.integration.rooms.harness import GRANT_SECRET
from tools.devstack import Stack

WAIT_S = 30.0  # only a failure waits this long


class Replicas:
    """Two rooms processes on the test's PostgreSQL and Valkey."""

    def __init__(self, identity: Identity, stacks: list[Stack]) -> None:
        self.identity = identity
        self.stacks = stacks
        self.channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{s.services['rooms'].grpc_port}") for s in stacks
        ]
        self.stubs = [pb_grpc.RoomsServiceStub(c) for c in self.channels]

    def as_user(self, user: str) -> tuple[tuple[str, str], ...]:
        return self.identity.token_for(user)


@pytest.fixture
async def replicas(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Replicas]:
    media = RecordingMediaControl()
    async with (
        running_identity(database_url, redis_url) as identity,
        running_media(media) as media_service,
        running_payments(TicketBook()) as payments_service,
    ):
        env = {
            "SPACES_INTERNAL_SECRET": TEST_INTERNAL_SECRET,
            "SPACES_MEDIA_GRANT_SECRET": GRANT_SECRET,
            "ROOMS_LIVE_RESUME_TOKEN_SECRET": "test-secret-test-secret-test-secret",
            "SPACES_IDENTITY_ADDR": f"127.0.0.1:{identity.service.port}",
            "SPACES_MEDIA_ADDR": f"127.0.0.1:{media_service.port}",
            "SPACES_PAYMENTS_ADDR": f"127.0.0.1:{payments_service.port}",
        }
        stacks = []
        for name in ("a", "b"):
            stack = Stack(tmp_path / name, auto_ports=True, only=("rooms",), extra_env=env)
            stack.database_url = database_url
            stack.redis_url = redis_url
            stacks.append(stack)
        try:
            for stack in stacks:  # one after the other: the first applies the migrations
                await asyncio.to_thread(stack.start)
            running = Replicas(identity, stacks)
            try:
                yield running
            finally:
                for channel in running.channels:
                    await channel.close(None)
        finally:
            for stack in stacks:
                await asyncio.to_thread(stack.stop)


async def pin(
    stub: pb_grpc.RoomsServiceStub, r: Replicas, space: str, host: str, text: str
) -> None:
    await stub.PinMessage(pb.PinMessageRequest(name=space, text=text), metadata=r.as_user(host))


class Stream:
    """One WatchSpace stream read in the background until a pin with ``stop`` (or its end)."""

    def __init__(
        self,
        stub: pb_grpc.RoomsServiceStub,
        r: Replicas,
        space: str,
        user: str,
        stop: str,
        token: str = "",
    ) -> None:
        self.events: list[ev.SpaceEvent] = []
        self.opened = asyncio.Event()
        self.error: grpc.aio.AioRpcError | None = None
        self._stop = stop
        self.call = stub.WatchSpace(
            pb.WatchSpaceRequest(name=space, resume_token=token), metadata=r.as_user(user)
        )
        self.done = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.events.extend(response.events)
                self.opened.set()
                if any(
                    e.pinned_message_changed.pinned_message.text == self._stop
                    for e in response.events
                ):
                    self.call.cancel()
                    return
        except grpc.aio.AioRpcError as error:
            self.error = error


async def test_two_rooms_processes_give_watchers_one_sequence_and_resume_across_them(
    replicas: Replicas,
) -> None:
    r = replicas
    host, *people = await r.identity.bulk_users(6, prefix=f"p{uuid.uuid4().hex[:6]}")
    a, b = r.stubs
    created = await a.CreateSpace(
        pb.CreateSpaceRequest(space=res.Space(title="Two"), request_id=str(uuid.uuid4())),
        metadata=r.as_user(host),
    )
    space = created.space.name
    on_a = Stream(a, r, space, host, "the end")
    on_b = Stream(b, r, space, host, "the end")
    leaving = Stream(a, r, space, host, "never")  # cut when process a stops
    for stream in (on_a, on_b, leaving):
        await asyncio.wait_for(stream.opened.wait(), WAIT_S)

    async def session(i: int, user: str) -> None:
        mine, other = (a, b) if i % 2 else (b, a)
        await mine.JoinSpace(
            pb.JoinSpaceRequest(name=space, request_id=str(uuid.uuid4())),
            metadata=r.as_user(user),
        )
        await other.RequestToSpeak(pb.RequestToSpeakRequest(name=space), metadata=r.as_user(user))
        await mine.ApproveSpeaker(
            pb.ApproveSpeakerRequest(name=f"{space}/participants/{user}"),
            metadata=r.as_user(host),
        )
        await other.SetOwnMute(
            pb.SetOwnMuteRequest(name=space, muted=False), metadata=r.as_user(user)
        )

    await asyncio.gather(*(session(i, u) for i, u in enumerate(people[:4])))
    await pin(b, r, space, host, "the end")
    await asyncio.wait_for(asyncio.gather(on_a.done, on_b.done), WAIT_S)
    after = max(on_a.events[0].sequence, on_b.events[0].sequence)
    tails = [[e.SerializeToString() for e in s.events if e.sequence > after] for s in (on_a, on_b)]
    assert tails[0] and tails[0] == tails[1]
    kinds = {e.WhichOneof("event") for e in on_a.events if e.sequence > after}
    assert {"participant_joined", "hand_raised", "role_changed", "mute_changed"} <= kinds

    # Process a stops: its streams end resumably; the app resumes on b and misses nothing.
    await asyncio.to_thread(r.stacks[0].stop_service, "rooms")
    await asyncio.wait_for(leaving.done, WAIT_S)
    assert leaving.error is not None
    assert leaving.error.code() == grpc.StatusCode.UNAVAILABLE
    last = leaving.events[-1]
    await b.JoinSpace(
        pb.JoinSpaceRequest(name=space, request_id=str(uuid.uuid4())),
        metadata=r.as_user(people[4]),
    )
    await pin(b, r, space, host, "resumed")
    resumed = Stream(b, r, space, host, "resumed", token=last.resume_token)
    await asyncio.wait_for(resumed.done, WAIT_S)
    assert resumed.error is None
    assert not any(e.HasField("snapshot") for e in resumed.events)
    sequences = [e.sequence for e in resumed.events]
    assert sequences[0] == last.sequence + 1
    assert sequences == list(range(sequences[0], sequences[-1] + 1))
    assert any(
        e.participant_joined.participant.user == f"users/{people[4]}" for e in resumed.events
    )
