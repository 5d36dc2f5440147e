"""Kill and restart the rooms process during a live Space.

A Space with a co-host, two speakers and three raised hands is watched by the host and by a
listener (each watcher re-watches with its last resume_token when its stream breaks, as the
apps do). rooms is killed with SIGKILL (no graceful anything) while a client keeps raising
and lowering hands, then started again on the same port. Afterwards:

* participants, roles and raised hands are exactly what they were before the kill, plus
  the changes the client had acknowledged;
* both watchers resumed (no new snapshot) and, together with what came after, received
  every durable event of the Space's log in sequence order with no gap;
* the figures printed: time for rooms to be SERVING again, and for the watchers to resume.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.json_format import MessageToDict

from tests.resilience.harness import Api, User, Watcher, create_live_space, signup
from tools.devstack import Stack

pytestmark = pytest.mark.resilience


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


async def test_rooms_killed_and_restarted_during_a_space(stack: Stack, api: Api) -> None:
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

    host_watch = Watcher(api, host.token, space).start()
    listener_watch = Watcher(api, hands[0].token, space).start()
    await host_watch.wait_for(lambda e: e.WhichOneof("event") == "snapshot")
    await listener_watch.wait_for(lambda e: e.WhichOneof("event") == "snapshot")
    first_seq = host_watch.events[0].sequence

    # A client keeps changing state through the kill; it remembers what was acknowledged.
    acknowledged: list[bool] = []
    refused: list[grpc.StatusCode] = []
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
                refused.append(result.code)
            await asyncio.sleep(0.05)

    toggling = asyncio.create_task(toggle_hand())
    await asyncio.sleep(1.0)
    before_seq = host_watch.last_seq

    killed_at = time.monotonic()
    await asyncio.to_thread(stack.kill_service, "rooms")
    await asyncio.sleep(1.0)  # down for a second, with the client still trying
    await asyncio.to_thread(stack.start_service, "rooms")
    serving_s = time.monotonic() - killed_at

    def resumed(watcher: Watcher) -> bool:
        return any(t > killed_at for t in watcher.resumed_at)

    # The host sees the toggler's hands, so its watcher shows when the stream is back; the
    # listener sees no hands (moderators only) and shows it with the next change below.
    deadline = time.monotonic() + 15
    while not resumed(host_watch) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    stop.set()
    await toggling
    assert resumed(host_watch), f"the host's watcher never resumed: {host_watch.breaks}"
    resume_s = host_watch.resumed_at[-1] - killed_at

    # A change after the restart reaches both watchers.
    await api.ok(
        "RoomsService.ApproveSpeaker", token=host.token, name=f"{name}/participants/{hands[1].id}"
    )
    for watcher in (host_watch, listener_watch):
        await watcher.wait_for(
            lambda e: (
                e.WhichOneof("event") == "role_changed"
                and e.role_changed.participant.user == hands[1].name
            )
        )
    assert resumed(listener_watch), f"the listener never resumed: {listener_watch.breaks}"
    after = await _participants(api, host, space)
    await host_watch.stop()
    await listener_watch.stop()

    print(
        f"\nrooms restart: SERVING again {serving_s:.2f} s after SIGKILL, watchers resumed"
        f" {resume_s:.2f} s after it; {len(acknowledged)} hand changes acknowledged,"
        f" {len(refused)} refused while down ({sorted({c.name for c in refused})}),"
        f" events seq {first_seq}..{host_watch.last_seq} (kill at {before_seq})"
    )
    assert host_watch.breaks and listener_watch.breaks, "the kill did not break the streams"
    assert host_watch.snapshots == 1 and listener_watch.snapshots == 1, "a watcher lost its place"
    assert refused, "the client never noticed rooms was down"
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

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

    # No gap: the host's watcher saw every durable event of the log, in order.
    seen = [int(e.sequence) for e in host_watch.events]
    assert seen == sorted(seen) and len(seen) == len(set(seen)), "out of order or repeated"
    durable = _durable_seqs(stack, space, first_seq)
    missing = sorted(set(durable) - set(seen))
    assert not missing, f"events never delivered to the host's watcher: {missing}"
    listener_seen = {int(e.sequence) for e in listener_watch.events}
    assert listener_seen and max(listener_seen) >= before_seq
