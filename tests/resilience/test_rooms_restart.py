"""Kill and restart every rooms process during a live Space.

rooms runs as two replicas (``Stack(rooms_replicas=2)``, as ``make up`` does), with nothing
of a Space kept in a process. A Space with a co-host, two speakers and three raised hands is
watched three times: the host on each replica (a stream pinned to replica 1, one pinned to
replica 2) and a listener through the address every caller of rooms gets (both replicas,
failing over). Each watcher re-watches with its last resume_token when its stream breaks, as
the apps do. A client keeps raising and lowering a hand through that same address while:

1. replica 1 is killed with SIGKILL: the client fails over to replica 2 and carries on;
2. a second later replica 2 is killed too: rooms stays gone for a second with the client
   still trying, then every replica is started again on its port, all at once.

Afterwards:

* participants, roles and raised hands are exactly what they were before the kills, plus
  the changes the client had acknowledged;
* every watcher resumed (no new snapshot), and both host watchers, one per replica, received
  every durable event of the Space's log, in sequence order with no gap: the same sequence;
* the figures printed: time for the replicas to be SERVING again, and for the watchers to
  resume.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psycopg
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.json_format import MessageToDict

from tests.resilience.harness import Api, User, Watcher, create_live_space, signup
from tools.devstack import Stack

pytestmark = pytest.mark.resilience

REPLICAS = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own: the shared one runs a single rooms process."""
    run_dir: Path = tmp_path_factory.mktemp("rooms-replicas")
    with Stack(run_dir, auto_ports=True, rooms_replicas=REPLICAS) as running:
        yield running


class RoomsVia(Api):
    """:class:`Api` whose rooms calls go one way: to one replica (``rooms``, ``rooms-2``), or
    with ``None`` to ``SPACES_ROOMS_ADDR``, the failing-over address the gateway, media and
    payments call rooms through."""

    FAILOVER = "rooms (every replica)"

    def __init__(self, stack: Stack, replica: str | None) -> None:
        super().__init__(stack)
        self._rooms = replica or self.FAILOVER
        if replica is None:
            self._channels[self.FAILOVER] = grpc.aio.insecure_channel(
                stack.environment()["SPACES_ROOMS_ADDR"],
                # Reconnect quickly after a restart, as the harness's own channels do.
                options=[
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 500),
                ],
            )

    def channel(self, method: MethodDescriptor) -> grpc.aio.Channel:
        if method.containing_service.full_name.startswith("spaces.rooms."):
            return self._channels[self._rooms]
        return super().channel(method)


@pytest.fixture(scope="module")
async def api(stack: Stack) -> AsyncIterator[Api]:
    """Calls of the test's client: rooms through the failing-over address."""
    client = RoomsVia(stack, None)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="module")
async def pinned(stack: Stack) -> AsyncIterator[list[Api]]:
    """One :class:`Api` per rooms replica, whose rooms calls reach that replica only."""
    clients: list[Api] = [RoomsVia(stack, name) for name in stack.processes_of("rooms")]
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


async def _participants(api: Api, host: User, space: str) -> dict[str, Any]:
    everyone = await api.ok(
        "RoomsService.ListParticipants", token=host.token, parent=f"spaces/{space}", page_size=100
    )
    hands = await api.ok(
        "RoomsService.ListParticipants",
        token=host.token,
        parent=f"spaces/{space}",
        hand_raised_only=True,
    )
    return {
        "participants": [MessageToDict(p) for p in everyone.participants],
        "hands": [p.user for p in hands.participants],
    }


def _durable_seqs(stack: Stack, space: str, after: int) -> list[int]:
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute(
            "SELECT seq FROM rooms.space_events WHERE space_id = %s AND seq > %s"
            " AND NOT ephemeral ORDER BY seq",
            (space, after),
        ).fetchall()
    return [int(r[0]) for r in rows]


def _resumed(watcher: Watcher, since: float) -> bool:
    return any(t > since for t in watcher.resumed_at)


async def _until_resumed(watchers: list[Watcher], since: float, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(_resumed(w, since) for w in watchers) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for watcher in watchers:
        assert _resumed(watcher, since), f"a host watcher never resumed: {watcher.breaks}"


async def _restart(stack: Stack, names: list[str], since: float) -> dict[str, float]:
    """Start the processes again, all at once (as an orchestrator would); return the seconds
    from ``since`` until each was SERVING."""

    def start(name: str) -> float:
        stack.start_service(name)
        return time.monotonic() - since

    serving = await asyncio.gather(*(asyncio.to_thread(start, name) for name in names))
    return dict(zip(names, serving, strict=True))


async def test_every_rooms_replica_killed_and_restarted_during_a_space(
    stack: Stack, api: Api, pinned: list[Api]
) -> None:
    replicas = stack.processes_of("rooms")
    assert len(replicas) == REPLICAS
    host = await signup(api, "host")
    cohost, s1, s2 = [await signup(api, n) for n in ("cohost", "spk1", "spk2")]
    hands = [await signup(api, f"hand{i}") for i in range(3)]
    toggler = await signup(api, "toggle")
    space = await create_live_space(api, host)
    name = f"spaces/{space}"
    for user in [cohost, s1, s2, *hands, toggler]:
        await api.ok(
            "RoomsService.JoinSpace", token=user.token, name=name, request_id=str(uuid.uuid4())
        )
    await api.ok(
        "RoomsService.AddCoHost", token=host.token, name=f"{name}/participants/{cohost.id}"
    )
    await api.ok("RoomsService.AcceptCoHostInvitation", token=cohost.token, name=name)
    for speaker in (s1, s2):
        await api.ok(
            "RoomsService.InviteToSpeak", token=host.token, name=f"{name}/participants/{speaker.id}"
        )
        await api.ok("RoomsService.AcceptSpeakInvitation", token=speaker.token, name=name)
    for user in hands:
        await api.ok("RoomsService.RequestToSpeak", token=user.token, name=name)

    # The host watches on each replica; a listener through the failing-over address.
    host_watches = [Watcher(client, host.token, space).start() for client in pinned]
    listener_watch = Watcher(api, hands[0].token, space).start()
    watchers = [*host_watches, listener_watch]
    for watcher in watchers:
        await watcher.wait_for(lambda e: e.WhichOneof("event") == "snapshot")
    first_seq = max(w.events[0].sequence for w in host_watches)

    # A client keeps changing state through the kills; it remembers what was acknowledged,
    # and when each refusal came.
    acknowledged: list[bool] = []
    refused: list[tuple[float, grpc.StatusCode]] = []
    stop = asyncio.Event()

    async def toggle_hand() -> None:
        raised = False
        while not stop.is_set():
            method = "RoomsService.CancelSpeakRequest" if raised else "RoomsService.RequestToSpeak"
            result = await api.call(method, token=toggler.token, name=name, timeout=2)
            if result.ok:
                raised = not raised
                acknowledged.append(raised)
            else:
                refused.append((time.monotonic(), result.code))
            await asyncio.sleep(0.05)

    toggling = asyncio.create_task(toggle_hand())
    await asyncio.sleep(0.5)

    # Replica 1 dies first: the failing-over address (connected to it, the first one) moves
    # to replica 2 and the client carries on; the host's stream pinned to replica 1 waits.
    acked_before = len(acknowledged)
    await asyncio.to_thread(stack.kill_service, replicas[0])
    await asyncio.sleep(1.0)
    acked_while_one_down = len(acknowledged) - acked_before
    refused_while_one_down = len(refused)

    # Then every other replica: rooms is gone altogether for a second, with the client still
    # trying, and all replicas start again at once (as an orchestrator would).
    before_seq = max(w.last_seq for w in host_watches)
    killed_at = time.monotonic()
    await asyncio.gather(*(asyncio.to_thread(stack.kill_service, n) for n in replicas[1:]))
    await asyncio.sleep(1.0)
    serving = await _restart(stack, replicas, killed_at)

    # The host sees the toggler's hands, so its watchers show when their streams are back;
    # the listener sees no hands (moderators only) and shows it with the next change below.
    await _until_resumed(host_watches, killed_at)
    await asyncio.sleep(0.5)
    stop.set()
    await toggling
    resume_s = {
        replica: min(t for t in w.resumed_at if t > killed_at) - killed_at
        for replica, w in zip(replicas, host_watches, strict=True)
    }

    # A change after the restart reaches every watcher.
    await api.ok(
        "RoomsService.ApproveSpeaker", token=host.token, name=f"{name}/participants/{hands[1].id}"
    )
    for watcher in watchers:
        await watcher.wait_for(
            lambda e: (
                e.WhichOneof("event") == "role_changed"
                and e.role_changed.participant.user == hands[1].name
            )
        )
    assert _resumed(listener_watch, killed_at), (
        f"the listener never resumed: {listener_watch.breaks}"
    )
    after = await _participants(api, host, space)
    for watcher in watchers:
        await watcher.stop()

    refused_codes = sorted({code.name for _, code in refused})
    print(
        f"\nrooms x{REPLICAS}, {replicas[0]} killed: {acked_while_one_down} hand changes"
        f" acknowledged and {refused_while_one_down} refused in the second it alone was down;"
        f"\nall killed: SERVING again "
        + ", ".join(f"{n} {s:.2f} s" for n, s in serving.items())
        + " after SIGKILL; host watchers resumed "
        + ", ".join(f"on {n} {s:.2f} s" for n, s in resume_s.items())
        + f" after it; {len(acknowledged)} hand changes acknowledged, {len(refused)} refused"
        f" ({refused_codes}), events seq {first_seq}..{host_watches[0].last_seq}"
        f" (all killed at {before_seq})"
    )
    # One replica down costs the client at most the call that was in flight on it.
    assert acked_while_one_down > 0, "the client did not fail over to the other replica"
    assert refused_while_one_down <= 1, f"refused while a replica was up: {refused}"
    for watcher in watchers:
        assert watcher.breaks, "the kill did not break a stream"
        assert watcher.snapshots == 1, "a watcher lost its place"
    assert any(t > killed_at for t, _ in refused), "the client never noticed rooms was down"
    assert set(refused_codes) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}

    # State survived: roles as set up, the three hands (one now approved), the toggler's
    # last acknowledged hand.
    roles = {p["user"]: p["role"] for p in after["participants"]}
    assert roles[host.name] == "PARTICIPANT_ROLE_HOST"
    assert roles[cohost.name] == "PARTICIPANT_ROLE_CO_HOST"
    assert roles[s1.name] == roles[s2.name] == roles[hands[1].name] == "PARTICIPANT_ROLE_SPEAKER"
    expected_hands = {hands[0].name, hands[2].name} | (
        {toggler.name} if acknowledged[-1] else set()
    )
    assert set(after["hands"]) == expected_hands

    # No gap: each host watcher, one per replica, saw every durable event of the log, in
    # order; so both saw the same sequence.
    durable = _durable_seqs(stack, space, first_seq)
    durable_set = set(durable)
    for replica, watcher in zip(replicas, host_watches, strict=True):
        seen = [int(e.sequence) for e in watcher.events]
        assert seen == sorted(seen) and len(seen) == len(set(seen)), f"{replica}: out of order"
        missing = sorted(durable_set - set(seen))
        assert not missing, f"events never delivered to the host's watcher on {replica}: {missing}"
    same = [
        [e.SerializeToString() for e in w.events if int(e.sequence) in durable_set]
        for w in host_watches
    ]
    assert same[0] == same[1], "the replicas' watchers saw different events"
    listener_seen = {int(e.sequence) for e in listener_watch.events}
    assert listener_seen and max(listener_seen) >= before_seq
