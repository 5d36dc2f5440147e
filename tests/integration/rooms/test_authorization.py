"""Who may moderate: every moderation RPC × every role, as one literal table.

Each case builds a fresh live Space with someone in every role (host H, co-hosts C1 and
C2 (C2 unmuted), speakers S1 and S2 (S2 unmuted), listeners L1 and L2 with L2's hand up, an
outsider who never joined, and a user the host blocked), calls one RPC as one role, and
checks the outcome. A denied call must leave the Space exactly as it was: its row, every
participant row, the invite and ban lists, the outbox and what media was told.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from spaces.rooms.v1 import rooms_resources_pb2 as res
from spaces.rooms.v1 import rooms_service_pb2 as pb

from tests.integration.rooms.harness import RoomsHarness, reason, running_rooms

OK = "OK"
NOT_FOUND = "SPACE_NOT_FOUND"
NOT_MOD = "NOT_MODERATOR"
NOT_HOST = "NOT_HOST"
CANNOT = "CANNOT_MODERATE_TARGET"
ROLES = ("host", "co_host", "speaker", "listener", "outsider", "blocked")

# rpc                       host        co_host     speaker  listener  outsider  blocked
TABLE: dict[str, tuple[str, str, str, str, str, str]] = {
    "ApproveSpeaker(L2)":      (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "DenySpeaker(L2)":         (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "InviteToSpeak(L1)":       (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "RevokeSpeaker(S2)":       (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "AddCoHost(L1)":           (OK,        NOT_HOST,   NOT_HOST, NOT_HOST, NOT_HOST, NOT_FOUND),
    "RemoveCoHost(C2)":        (OK,        NOT_HOST,   NOT_HOST, NOT_HOST, NOT_HOST, NOT_FOUND),
    "MuteParticipant(S2)":     (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "MuteParticipant(C2)":     (OK,        CANNOT,     NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "MuteParticipant(H)":      (CANNOT,    CANNOT,     NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "RemoveParticipant(L2)":   (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "RemoveParticipant(C2)":   (OK,        CANNOT,     NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "RemoveParticipant(H)":    ("TARGET_IS_CALLER", CANNOT, NOT_MOD, NOT_MOD, NOT_MOD, NOT_FOUND),
    "SetSpeakPermission":      (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "PinMessage":              (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "InviteUsers":             (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "CreateJoinLink":          (OK,        OK,         NOT_MOD, NOT_MOD,  NOT_MOD,  NOT_FOUND),
    "UpdateSpace":             (OK,        NOT_HOST,   NOT_HOST, NOT_HOST, NOT_HOST, NOT_FOUND),
    "EndSpace":                (OK,        NOT_HOST,   NOT_HOST, NOT_HOST, NOT_HOST, NOT_FOUND),
}  # fmt: skip

CASES = [
    pytest.param(rpc, role, expected, id=f"{rpc}-{role}")
    for rpc, row in TABLE.items()
    for role, expected in zip(ROLES, row, strict=True)
]


@dataclass
class Stage:
    """A live Space with someone in every role."""

    space: res.Space
    people: dict[str, str]  # H, C1, C2, S1, S2, L1, L2, O, B -> user id

    def caller(self, role: str) -> str:
        return self.people[
            {"host": "H", "co_host": "C1", "speaker": "S1", "listener": "L1",
             "outsider": "O", "blocked": "B"}[role]
        ]  # fmt: skip

    def participant(self, who: str) -> str:
        return f"{self.space.name}/participants/{self.people[who]}"


async def build_stage(rooms: RoomsHarness) -> Stage:
    ids = await rooms.users(9, prefix="m")
    people = dict(zip(["H", "C1", "C2", "S1", "S2", "L1", "L2", "O", "B"], ids, strict=True))
    host = people["H"]
    await rooms.block(host, people["B"])
    space = await rooms.create(host)
    await asyncio.gather(
        *(rooms.join(space, people[k]) for k in ("C1", "C2", "S1", "S2", "L1", "L2"))
    )
    await rooms.make_co_host(space, host, people["C1"])
    await rooms.make_co_host(space, host, people["C2"])
    await rooms.make_speaker(space, host, people["S1"])
    await rooms.make_speaker(space, host, people["S2"])
    for unmuted in ("S2", "C2"):
        await rooms.stub.SetOwnMute(
            pb.SetOwnMuteRequest(name=space.name, muted=False),
            metadata=rooms.as_user(people[unmuted]),
        )
    await rooms.stub.RequestToSpeak(
        pb.RequestToSpeakRequest(name=space.name), metadata=rooms.as_user(people["L2"])
    )
    return Stage(space, people)


Call = Callable[[RoomsHarness, Stage, Any], Awaitable[Any]]


def _calls() -> dict[str, Call]:
    def p(s: Stage, who: str) -> str:
        return s.participant(who)

    return {
        "ApproveSpeaker(L2)": lambda r, s, m: r.stub.ApproveSpeaker(
            pb.ApproveSpeakerRequest(name=p(s, "L2")), metadata=m
        ),
        "DenySpeaker(L2)": lambda r, s, m: r.stub.DenySpeaker(
            pb.DenySpeakerRequest(name=p(s, "L2")), metadata=m
        ),
        "InviteToSpeak(L1)": lambda r, s, m: r.stub.InviteToSpeak(
            pb.InviteToSpeakRequest(name=p(s, "L1")), metadata=m
        ),
        "RevokeSpeaker(S2)": lambda r, s, m: r.stub.RevokeSpeaker(
            pb.RevokeSpeakerRequest(name=p(s, "S2")), metadata=m
        ),
        "AddCoHost(L1)": lambda r, s, m: r.stub.AddCoHost(
            pb.AddCoHostRequest(name=p(s, "L1")), metadata=m
        ),
        "RemoveCoHost(C2)": lambda r, s, m: r.stub.RemoveCoHost(
            pb.RemoveCoHostRequest(name=p(s, "C2")), metadata=m
        ),
        "MuteParticipant(S2)": lambda r, s, m: r.stub.MuteParticipant(
            pb.MuteParticipantRequest(name=p(s, "S2")), metadata=m
        ),
        "MuteParticipant(C2)": lambda r, s, m: r.stub.MuteParticipant(
            pb.MuteParticipantRequest(name=p(s, "C2")), metadata=m
        ),
        "MuteParticipant(H)": lambda r, s, m: r.stub.MuteParticipant(
            pb.MuteParticipantRequest(name=p(s, "H")), metadata=m
        ),
        "RemoveParticipant(L2)": lambda r, s, m: r.stub.RemoveParticipant(
            pb.RemoveParticipantRequest(name=p(s, "L2"), block_from_space=True), metadata=m
        ),
        "RemoveParticipant(C2)": lambda r, s, m: r.stub.RemoveParticipant(
            pb.RemoveParticipantRequest(name=p(s, "C2")), metadata=m
        ),
        "RemoveParticipant(H)": lambda r, s, m: r.stub.RemoveParticipant(
            pb.RemoveParticipantRequest(name=p(s, "H")), metadata=m
        ),
        "SetSpeakPermission": lambda r, s, m: r.stub.SetSpeakPermission(
            pb.SetSpeakPermissionRequest(
                name=s.space.name, speak_permission=res.SPEAK_PERMISSION_INVITED_ONLY
            ),
            metadata=m,
        ),
        "PinMessage": lambda r, s, m: r.stub.PinMessage(
            pb.PinMessageRequest(name=s.space.name, text="Welcome"), metadata=m
        ),
        "InviteUsers": lambda r, s, m: r.stub.InviteUsers(
            pb.InviteUsersRequest(name=s.space.name, users=[f"users/{s.people['O']}"]),
            metadata=m,
        ),
        "CreateJoinLink": lambda r, s, m: r.stub.CreateJoinLink(
            pb.CreateJoinLinkRequest(name=s.space.name, ttl=duration_pb2.Duration(seconds=600)),
            metadata=m,
        ),
        "UpdateSpace": lambda r, s, m: r.stub.UpdateSpace(
            pb.UpdateSpaceRequest(
                space=res.Space(name=s.space.name, title="Renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            metadata=m,
        ),
        "EndSpace": lambda r, s, m: r.stub.EndSpace(
            pb.EndSpaceRequest(name=s.space.name), metadata=m
        ),
    }


CALLS = _calls()


async def state_of(rooms: RoomsHarness, space_id: str) -> dict[str, Any]:
    """Everything a moderation call could change."""
    return {
        "space": await rooms.sql("SELECT * FROM spaces WHERE id = %s", space_id),
        "participants": await rooms.sql(
            "SELECT * FROM participants WHERE space_id = %s ORDER BY user_id", space_id
        ),
        "invites": await rooms.sql("SELECT * FROM space_invites WHERE space_id = %s", space_id),
        "bans": await rooms.sql("SELECT * FROM space_bans WHERE space_id = %s", space_id),
        # Events ever written: the relay moves rows away, but never lowers this sum.
        "outbox": await rooms.sql(
            "SELECT (SELECT last_seq FROM outbox_relay_state)"
            " + (SELECT count(*) FROM outbox WHERE relay_seq IS NULL)"
        ),
        "media": len(rooms.media.calls),
    }


@pytest.fixture(scope="module")
def module_database(postgres_server_url: str) -> Iterator[str]:
    """One database for the whole matrix: every case builds its own Space in it."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(postgres_server_url)
    params["dbname"] = name
    try:
        yield make_conninfo(**params)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="module")
async def matrix_rooms(module_database: str, redis_server_url: str) -> AsyncIterator[RoomsHarness]:
    """Rooms for the matrix. Three co-host places, so the host can add one more."""
    redis_url = redis_server_url.rsplit("/", 1)[0] + "/15"
    async with running_rooms(module_database, redis_url, max_co_hosts=3) as running:
        yield running


@pytest.mark.parametrize(("rpc", "role", "expected"), CASES)
async def test_moderation_matrix(
    matrix_rooms: RoomsHarness, rpc: str, role: str, expected: str
) -> None:
    rooms = matrix_rooms
    stage = await build_stage(rooms)
    metadata = rooms.as_user(stage.caller(role))
    before = await state_of(rooms, stage.space.id)
    if expected == OK:
        await CALLS[rpc](rooms, stage, metadata)
        if rpc != "CreateJoinLink":  # a link is signed, not stored
            assert await state_of(rooms, stage.space.id) != before, "an allowed call did nothing"
        return
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await CALLS[rpc](rooms, stage, metadata)
    assert reason(caught.value) == expected
    if expected == NOT_FOUND:
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await state_of(rooms, stage.space.id) == before, "a denied call changed something"
