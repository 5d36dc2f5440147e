"""Rooms' metrics for the dashboard, and the block cache on the join/watch path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY
from spaces.identity.v1 import identity_service_pb2 as id_pb
from spaces.rooms.v1 import rooms_service_pb2 as pb

from tests.integration.rooms.harness import RoomsHarness, reason, running_rooms
from tests.integration.rooms.test_features import Watcher

WAIT_S = 10.0  # only a failure waits this long


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


async def test_dashboard_metrics(rooms: RoomsHarness) -> None:
    host, other_host, *people = await rooms.users(6)
    space = await rooms.create(host)
    await rooms.create(other_host)
    for user in people:
        await rooms.join(space, user)
    await rooms.make_speaker(space, host, people[0])
    await rooms.make_co_host(space, host, people[1])
    published = sample("spaces_rooms_live_events_published_total")
    delivered = sample("spaces_rooms_live_event_deliveries_total")
    watchers = sample("spaces_rooms_live_watchers")
    watcher = Watcher(rooms, space, host)
    await watcher.wait_for("snapshot", WAIT_S)
    assert sample("spaces_rooms_live_watchers") == watchers + 1
    await rooms.stub.PinMessage(
        pb.PinMessageRequest(name=space.name, text="hello"), metadata=rooms.as_user(host)
    )
    await watcher.wait_for("pinned_message_changed", WAIT_S)
    assert sample("spaces_rooms_live_events_published_total") > published
    assert sample("spaces_rooms_live_event_deliveries_total") > delivered

    await rooms.runtime.refresh_gauges()
    assert sample("spaces_rooms_live_spaces") == 2
    assert sample("spaces_rooms_participants", role="host") == 2
    assert sample("spaces_rooms_participants", role="co_host") == 1
    assert sample("spaces_rooms_participants", role="speaker") == 1
    assert sample("spaces_rooms_participants", role="listener") == 2
    await rooms.stub.EndSpace(pb.EndSpaceRequest(name=space.name), metadata=rooms.as_user(host))
    await asyncio.wait_for(watcher.done, WAIT_S)
    await rooms.runtime.refresh_gauges()
    assert sample("spaces_rooms_live_spaces") == 1
    assert sample("spaces_rooms_participants", role="listener") == 0


def test_rooms_metric_names_follow_the_conventions() -> None:
    names = {
        metric.name: metric.type
        for metric in REGISTRY.collect()
        if metric.name.startswith("spaces_rooms_")
    }
    assert {
        "spaces_rooms_live_spaces",
        "spaces_rooms_participants",
        "spaces_rooms_live_watchers",
        "spaces_rooms_live_events_published",
        "spaces_rooms_live_event_deliveries",
    } <= set(names)
    for metric in REGISTRY.collect():
        if not metric.name.startswith("spaces_rooms_"):
            continue
        for s in metric.samples:
            assert not {"space", "space_id", "user", "user_id"} & set(s.labels), s
            if metric.type != "counter":
                assert not s.name.endswith("_total"), s.name


@pytest.fixture
async def cached_rooms(database_url: str, redis_url: str) -> AsyncIterator[RoomsHarness]:
    """Rooms whose block answers would stay an hour: only invalidation can refresh them."""
    async with running_rooms(database_url, redis_url, block_cache_ttl_s=3600.0) as running:
        yield running


async def visible(rooms: RoomsHarness, space_name: str, user: str) -> bool:
    try:
        await rooms.stub.GetSpace(pb.GetSpaceRequest(name=space_name), metadata=rooms.as_user(user))
    except grpc.aio.AioRpcError as error:
        assert reason(error) == "SPACE_NOT_FOUND"
        return False
    return True


async def until(rooms: RoomsHarness, space_name: str, user: str, expected: bool) -> None:
    async def poll() -> None:
        while await visible(rooms, space_name, user) != expected:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), WAIT_S)


async def test_block_cache_is_used_and_dropped_when_a_block_is_made(
    cached_rooms: RoomsHarness,
) -> None:
    rooms = cached_rooms
    assert rooms.runtime.blocks is not None
    host, fan = await rooms.users(2)
    space = await rooms.create(host)
    await rooms.join(space, fan)
    hits = rooms.runtime.blocks.hits
    assert await visible(rooms, space.name, fan)
    assert await visible(rooms, space.name, fan)
    assert rooms.runtime.blocks.hits >= hits + 2  # identity was not asked again

    await rooms.block(host, fan)  # the cached "no block" would last an hour
    await until(rooms, space.name, fan, expected=False)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rooms.join(space, fan)
    assert reason(caught.value) == "SPACE_NOT_FOUND"

    await rooms.identity.stub.UnblockUser(
        id_pb.UnblockUserRequest(name=f"users/{fan}"), metadata=rooms.as_user(host)
    )
    await until(rooms, space.name, fan, expected=True)


async def test_host_blocking_a_participant_removes_them_from_the_live_space(
    rooms: RoomsHarness,
) -> None:
    host, fan, other = await rooms.users(3)
    space = await rooms.create(host)
    await rooms.join(space, fan)
    await rooms.join(space, other)
    watcher = Watcher(rooms, space, host)
    await watcher.wait_for("snapshot", WAIT_S)
    await rooms.block(host, fan)
    removed = await watcher.wait_for("participant_removed", WAIT_S)
    assert removed.participant_removed.participant == f"{space.name}/participants/{fan}"
    assert removed.participant_removed.removed_by == f"users/{host}"
    rows = await rooms.sql(
        "SELECT user_id, active FROM participants WHERE space_id = %s ORDER BY user_id", space.id
    )
    assert dict(rows)[fan] is False and dict(rows)[other] is True
    assert not await visible(rooms, space.name, fan)
    # A block the other way round (the user blocks the host) removes nobody.
    await rooms.block(other, host)
    await rooms.stub.PinMessage(
        pb.PinMessageRequest(name=space.name, text="marker"), metadata=rooms.as_user(host)
    )
    await watcher.wait_for("pinned_message_changed", WAIT_S)
    assert watcher.kinds().count("participant_removed") == 1
    watcher.call.cancel()
