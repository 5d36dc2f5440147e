"""Media fan-out: the Spaces fast path against a stock-aiortc SFU, in one run.

Both SFUs run in this process (the measured one) and forward the same pre-encoded Opus
stream of one speaker to the same listener peers (the fast path also ``--speakers`` at
the largest count, in a row of its own, the others joining only then), which run in separate
processes (``--listener-procs``): real aiortc peers that finish ICE and DTLS and then
only count the packets their sockets receive (no decode, no SRTP), so their cost stays
out of the measurement.

* fast: :class:`services.media.MediaEngine`; the speakers are real aiortc peers in a
  process of their own, publishing pre-encoded Opus through the engine's ingress.
* stock: one ``RTCPeerConnection`` per listener with one track per slot, each yielding
  ``av.Packet`` so aiortc's ``RTCRtpSender`` packs (never re-encodes) and sends them;
  the packets are handed to every listener's tracks in this process.

For each SFU and listener count: CPU time of this process per forwarded listener-packet,
egress packets/s per core (1e6 / µs), and the forwarding latency (fast: publisher packet
arrival to ``sendmmsg`` return; stock: hand-off to the track to the return of aiortc's
``_send_rtp``). The last stdout line is one JSON object; a plot goes to
``$BENCH_RESULTS_DIR`` (default ``bench/results``). Loopback only; it stops by itself.

Loopback delivery is the listeners' kernel work, but Linux runs it in the *sender's*
context (the softirq at the end of ``sendmmsg``), where it is charged to the measured
process (about 1 µs per listener-packet here). ``--steer`` (root: it writes
``/sys/class/net/lo/queues/rx-0/rps_cpus`` and restores it at the end) keeps it out as a
NIC would: the SFUs run on the first CPU, the peers on the others, and Receive Packet
Steering hands loopback receive processing to the peers' CPUs. It is off by default: on
two cores the SFU's event loop and egress thread then share one core, which costs more
than it saves. The JSON says ``receive_steered``.

``--profile`` instead profiles the fast path at the largest listener count: cProfile of
the Python code (egress inline), a stage timing of the egress loop on real sockets, and
``perf`` (when installed) by shared object.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import fractions
import gc
import io
import json
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pstats
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aioice.ice  # noqa: E402
import av  # noqa: E402
import cffi  # type: ignore[import-untyped]  # noqa: E402
import numpy as np  # noqa: E402
from aiortc import (  # noqa: E402
    MediaStreamTrack,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from services.common.telemetry import track_gc_pauses  # noqa: E402
from services.media import aiortc_internals as internals  # noqa: E402
from services.media.config import MediaConfig  # noqa: E402
from services.media.engine import MediaEngine  # noqa: E402
from services.media.metrics import FORWARD_LATENCY, LatencySamples  # noqa: E402
from services.media.rtp import is_rtcp  # noqa: E402

logger = logging.getLogger("bench.media_fanout")

TIME_BASE = fractions.Fraction(1, 48000)
FRAME = 960
PTIME = 0.02
SLOTS = 3


def loopback_only() -> None:
    """Make aioice gather on 127.0.0.1 only (it skips loopback by default)."""
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


def encode_tone(freq: float, seconds: float = 1.0, amplitude: float = 0.25) -> list[bytes]:
    """``seconds`` of a sine tone as 20 ms Opus packets (a loop of real Opus)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = 48000
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = 32000
    codec.time_base = TIME_BASE
    packets: list[bytes] = []
    total = int(seconds / PTIME) + 4
    for i in range(total):
        t = np.arange(i * FRAME, (i + 1) * FRAME) / 48000.0
        pcm = (amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = i * FRAME
        packets.extend(bytes(p) for p in codec.encode(frame))
    return packets[2 : 2 + int(seconds / PTIME)]


# -- listener / speaker processes ------------------------------------------------------

_RX_FFI = cffi.FFI()
_RX_FFI.cdef(
    """
    struct iovec { void *iov_base; size_t iov_len; };
    struct msghdr { void *msg_name; unsigned int msg_namelen; struct iovec *msg_iov;
                    size_t msg_iovlen; void *msg_control; size_t msg_controllen;
                    int msg_flags; };
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, void *timeout);
    """
)
_RX_BATCH = 64
_MSG_DONTWAIT = 0x40
GROW_PAUSE = 0.5
DRAIN_INTERVAL = float(os.environ.get("MEDIA_BENCH_DRAIN_INTERVAL", "0.05"))


class Drain:
    """Reads listener sockets in batches (``recvmmsg``) instead of aiortc; counts RTP and
    hands STUN back to aioice so ICE consent stays fresh."""

    def __init__(self) -> None:
        self.libc: Any = _RX_FFI.dlopen(None)
        self.msgs: Any = _RX_FFI.new("struct mmsghdr[]", _RX_BATCH)
        self.iov: Any = _RX_FFI.new("struct iovec[]", _RX_BATCH)
        self.names: Any = _RX_FFI.new("char[]", _RX_BATCH * 32)
        self.data: Any = _RX_FFI.new("char[]", _RX_BATCH * 2048)
        for i in range(_RX_BATCH):
            self.iov[i].iov_base = self.data + i * 2048
            self.iov[i].iov_len = 2048
            self.msgs[i].msg_hdr.msg_iov = self.iov + i
            self.msgs[i].msg_hdr.msg_iovlen = 1
            self.msgs[i].msg_hdr.msg_name = self.names + i * 32
            self.msgs[i].msg_hdr.msg_namelen = 32
        self.sockets: list[tuple[int, Any, list[int]]] = []
        self.packets = 0
        self.nbytes = 0
        data = np.frombuffer(_RX_FFI.buffer(self.data), dtype=np.uint8).reshape(_RX_BATCH, 2048)
        self.first_bytes = data[:, 0]
        self.second_bytes = data[:, 1]
        # msg_len is the last field of each 64-byte mmsghdr (after the 56-byte msghdr).
        size = _RX_FFI.sizeof("struct mmsghdr")
        self.lengths = np.frombuffer(_RX_FFI.buffer(self.msgs), dtype=np.uint32).reshape(
            _RX_BATCH, size // 4
        )[:, _RX_FFI.offsetof("struct mmsghdr", "msg_len") // 4]

    def add(self, pc: RTCPeerConnection) -> None:
        connection = internals.ice_connection(pc.getTransceivers()[0])
        pair = internals.nominated_pair(connection)
        assert pair is not None
        transport = pair.protocol.transport
        transport.pause_reading()  # type: ignore[attr-defined]
        fd = transport.get_extra_info("socket").fileno()
        self.sockets.append((fd, pair.protocol, [0]))

    def poll(self) -> None:
        """Read every socket dry; per batch, classify the datagrams with numpy (the first
        bytes: RTP, RTCP, STUN), so counting costs next to no Python per packet."""
        recv = self.libc.recvmmsg
        lengths = self.lengths
        first = self.first_bytes
        second = self.second_bytes
        for fd, protocol, count in self.sockets:
            while True:
                n = recv(fd, self.msgs, _RX_BATCH, _MSG_DONTWAIT, _RX_FFI.NULL)
                if n <= 0:
                    break
                heads = first[:n]
                rtp = (heads > 127) & (heads < 192) & ~((second[:n] >= 192) & (second[:n] <= 223))
                packets = int(rtp.sum())
                self.packets += packets
                self.nbytes += int(lengths[:n][rtp].sum())
                count[0] += packets
                for i in np.flatnonzero(heads < 2):
                    size = int(lengths[i])
                    raw = bytes(_RX_FFI.buffer(self.data + i * 2048, size))
                    name = bytes(_RX_FFI.buffer(self.names + i * 32, 8))
                    self.msgs[i].msg_hdr.msg_namelen = 32
                    addr = (socket.inet_ntoa(name[4:8]), int.from_bytes(name[2:4], "big"))
                    protocol.datagram_received(raw, addr)
                if n < _RX_BATCH:
                    break

    def reset(self) -> None:
        self.packets = self.nbytes = 0
        for _, _, count in self.sockets:
            count[0] = 0

    def per_listener(self) -> list[int]:
        return [count[0] for _, _, count in self.sockets]


class PacketTrack(MediaStreamTrack):
    """Yields pre-encoded Opus ``av.Packet`` at real time (a speaker's microphone)."""

    kind = "audio"

    def __init__(self, payloads: list[bytes]) -> None:
        super().__init__()
        self.payloads = payloads
        self.index = 0
        self.start: float | None = None

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.monotonic()
        delay = self.start + self.index * PTIME - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        packet = av.Packet(self.payloads[self.index % len(self.payloads)])
        packet.pts = self.index * FRAME
        packet.time_base = TIME_BASE
        self.index += 1
        return packet


async def _wait_connected(pcs: list[RTCPeerConnection], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [pc.connectionState for pc in pcs]
        if all(s in ("connected", "failed", "closed") for s in states):
            break
        await asyncio.sleep(0.05)
    return sum(1 for pc in pcs if pc.connectionState == "connected")


async def _peer_process(conn: mpc.Connection, tones: list[list[bytes]]) -> None:
    loopback_only()
    pcs: list[RTCPeerConnection] = []
    drain = Drain()
    loop = asyncio.get_running_loop()
    polling = True

    async def poller() -> None:
        # Polling (rather than waking on every datagram) keeps wake-ups of the listener
        # processes out of the SFU's sends: loopback delivers in the sender's context.
        while polling:
            drain.poll()
            await asyncio.sleep(DRAIN_INTERVAL)

    poll_task = asyncio.create_task(poller())
    while True:
        message = await loop.run_in_executor(None, conn.recv)
        command = message[0]
        if command == "connect":
            _, count, speakers, first = message
            batch: list[RTCPeerConnection] = []
            for i in range(first, first + count):
                pc = RTCPeerConnection()
                if speakers:
                    pc.addTransceiver(PacketTrack(tones[i % len(tones)]), direction="sendonly")
                else:
                    for _ in range(SLOTS):
                        internals.neutralize(pc.addTransceiver("audio", direction="recvonly"))
                await pc.setLocalDescription(await pc.createOffer())
                batch.append(pc)
            conn.send(("offers", [pc.localDescription.sdp for pc in batch]))
            answers = await loop.run_in_executor(None, conn.recv)
            await asyncio.gather(
                *(
                    pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
                    for pc, sdp in zip(batch, answers, strict=True)
                )
            )
            connected = await _wait_connected(batch, 60.0)
            if not speakers:
                for pc in batch:
                    if pc.connectionState == "connected":
                        drain.add(pc)
            pcs.extend(batch)
            conn.send(("connected", connected))
        elif command == "reset":
            drain.reset()
            conn.send(("ok",))
        elif command == "counts":
            conn.send(("counts", drain.packets, drain.nbytes, drain.per_listener()))
        elif command == "close":
            drain.poll()
            drain.sockets.clear()
            await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
            pcs.clear()
            conn.send(("ok",))
        elif command == "exit":
            polling = False
            await poll_task
            await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
            conn.send(("ok",))
            return


def peer_process_main(
    conn: mpc.Connection, tones: list[list[bytes]], cpus: set[int] | None = None
) -> None:
    """Entry point of a listener/speaker process (on ``cpus`` when given).

    The peers stand for other machines: they run under ``SCHED_IDLE``, so they take CPU
    only when the measured process does not want it and never preempt it (their receive
    polling would otherwise land in the middle of a fan-out and show up as its latency).
    """
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        os.nice(19)
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_peer_process(conn, tones))


class PeerProcess:
    """Parent-side handle of a listener/speaker process."""

    def __init__(self, ctx: Any, tones: list[list[bytes]]) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=peer_process_main, args=(child, tones, STEERING.peer_cpus), daemon=True
        )
        self.process.start()
        self.count = 0

    async def call(self, *message: Any) -> Any:
        self.conn.send(message)
        return await asyncio.get_running_loop().run_in_executor(None, self.conn.recv)

    async def connect(
        self, count: int, speakers: bool, answer: Callable[[str], Awaitable[str]], first: int = 0
    ) -> int:
        """Connect ``count`` more peers (speakers publish ``tones[first:]``, round)."""
        self.conn.send(("connect", count, speakers, first))
        loop = asyncio.get_running_loop()
        _, offers = await loop.run_in_executor(None, self.conn.recv)
        answers = await asyncio.gather(*(answer(offer) for offer in offers))
        self.conn.send(list(answers))
        _, connected = await loop.run_in_executor(None, self.conn.recv)
        self.count += count
        return int(connected)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=5)


# -- keeping the listeners' receive work out of the measured process ----------------


class ReceiveSteering:
    """SFUs on one CPU, peers and loopback receive processing (RPS) on the others."""

    RPS_CPUS = Path("/sys/class/net/lo/queues/rx-0/rps_cpus")

    def __init__(self) -> None:
        self.peer_cpus: set[int] | None = None
        self._previous: str | None = None

    def apply(self) -> bool:
        """Steer if this machine and user allow it; returns whether it is steered."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return False
        peers = set(cpus[1:])
        try:
            previous = self.RPS_CPUS.read_text().strip()
            self.RPS_CPUS.write_text(format(sum(1 << c for c in peers), "x"))
        except OSError as exc:
            print(f"receive steering unavailable ({exc}); figures include it", flush=True)
            return False
        self._previous = previous
        self.peer_cpus = peers
        # Before any thread starts: every thread of this process inherits it.
        os.sched_setaffinity(0, {cpus[0]})
        return True

    def restore(self) -> None:
        """Put ``rps_cpus`` back as it was."""
        if self._previous is not None:
            try:
                self.RPS_CPUS.write_text(self._previous)
            except OSError:
                logger.warning("could not restore %s", self.RPS_CPUS)
            self._previous = None


STEERING = ReceiveSteering()


# -- the two SFUs -------------------------------------------------------------------


class FastSfu:
    """The Spaces engine, fed by real speaker peers."""

    name = "fast"

    def __init__(
        self,
        threads: int,
        chunk: int,
        split: int,
        native_srtp: bool = True,
        consent_plane: bool = True,
    ) -> None:
        self.engine = MediaEngine(
            MediaConfig(
                egress_threads=threads,
                egress_chunk=chunk,
                egress_split=split,
                native_srtp=native_srtp,
                consent_plane=consent_plane,
                gc_freeze=True,  # as a node runs (MEDIA_GC_FREEZE)
            )
        )
        self.space = "bench"
        self.counter = 0
        self.speakers: list[str] = []

    async def start(self) -> None:
        await self.engine.start()

    async def answer(self, offer: str, may_publish: bool = False) -> str:
        self.counter += 1
        participant = f"p{self.counter}"
        if may_publish:
            self.speakers.append(participant)
        result = await self.engine.negotiate(
            self.space, participant, offer, may_publish=may_publish
        )
        return result.sdp_answer

    async def publish(self, offer: str) -> str:
        return await self.answer(offer, may_publish=True)

    def sent(self) -> float:
        return REGISTRY.get_sample_value("spaces_media_packets_sent_total") or 0.0

    def take_latencies(self) -> tuple[list[float], list[int]]:
        samples = FORWARD_LATENCY.samples
        return samples.take() if samples is not None else ([], [])

    async def close(self) -> None:
        await self.engine.close()


class StockTrack(MediaStreamTrack):
    """A slot of the stock SFU: packets handed in by the fan-out loop."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[tuple[av.Packet[Any], float]] = asyncio.Queue(maxsize=500)
        self.received = 0.0

    async def recv(self) -> av.Packet[Any]:
        packet, received = await self.queue.get()
        self.received = received
        return packet


class StockSfu:
    """One ``RTCPeerConnection`` per listener; aiortc's senders do all the work."""

    name = "stock"

    def __init__(self, speakers: list[list[bytes]]) -> None:
        self.speakers = speakers
        self.pcs: list[RTCPeerConnection] = []
        self.tracks: list[list[StockTrack]] = [[] for _ in speakers]
        self.sent_count = 0
        self.latencies: list[float] = []
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._feed())

    async def answer(self, offer: str) -> str:
        pc = RTCPeerConnection()
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        by_ssrc: dict[int, StockTrack] = {}
        for k, transceiver in enumerate(pc.getTransceivers()):
            transceiver.direction = "sendonly"
            track = StockTrack()
            transceiver.sender.replaceTrack(track)
            if k < len(self.speakers):
                self.tracks[k].append(track)
            by_ssrc[internals.sender_ssrc(transceiver.sender)] = track
        dtls = pc.getTransceivers()[0].receiver.transport
        original = dtls._send_rtp

        async def send_rtp(data: bytes) -> None:
            await original(data)
            if not is_rtcp(data):
                track = by_ssrc.get(int.from_bytes(data[8:12], "big"))
                if track is not None:
                    self.sent_count += 1
                    self.latencies.append(time.perf_counter() - track.received)

        dtls._send_rtp = send_rtp  # type: ignore[method-assign]
        await pc.setLocalDescription(await pc.createAnswer())
        self.pcs.append(pc)
        return str(pc.localDescription.sdp)

    async def _feed(self) -> None:
        start = time.monotonic()
        index = 0
        while True:
            delay = start + index * PTIME - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for s, payloads in enumerate(self.speakers):
                packet = av.Packet(payloads[index % len(payloads)])
                packet.pts = index * FRAME
                packet.time_base = TIME_BASE
                received = time.perf_counter()
                for track in self.tracks[s]:
                    try:
                        track.queue.put_nowait((packet, received))
                    except asyncio.QueueFull:
                        self.dropped += 1
            index += 1

    def sent(self) -> float:
        return float(self.sent_count)

    def take_latencies(self) -> tuple[list[float], list[int]]:
        values, self.latencies = self.latencies, []
        return values, [1] * len(values)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(pc.close() for pc in self.pcs), return_exceptions=True)
        self.pcs.clear()


# -- measurement ----------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def weighted_percentiles(
    values: list[float], counts: list[int], qs: tuple[float, ...]
) -> list[float]:
    if not values:
        return [float("nan")] * len(qs)
    v = np.asarray(values)
    w = np.asarray(counts, dtype=np.float64)
    order = np.argsort(v)
    cumulative = np.cumsum(w[order]) / w.sum()
    ranked = v[order]
    return [float(ranked[min(len(v) - 1, int(np.searchsorted(cumulative, q)))]) for q in qs]


async def measure(
    sfu: FastSfu | StockSfu,
    procs: list[PeerProcess],
    listeners: int,
    speakers: int,
    warmup: float,
    seconds: float,
    repeats: int = 1,
) -> dict[str, Any]:
    """Measure one SFU at its current listener count: ``repeats`` windows of ``seconds``.

    CPU per listener-packet is the median of the windows (the machine is shared and
    noisy); latency percentiles are over every listener-packet of every window.

    Growing to this count left hundreds of thousands of new objects (about 500 per
    session), and CPython's next full collection (which holds the GIL, so forwarding,
    for about 0.35 ms per session) would land in a window at random; it runs here, before
    the warm-up, so the windows measure steady forwarding (the fast path freezes joined
    sessions, as a node does, so it scans only what is not frozen yet; see
    :mod:`services.media.collector`). Collections inside the windows
    are still counted and reported (``gc_pauses``, ``gc_pause_total_ms``, from the
    ``spaces_gc_pause_seconds`` histogram every service exports).
    """
    started = time.perf_counter()
    gc.collect()
    full_collection_ms = (time.perf_counter() - started) * 1e3
    await asyncio.sleep(warmup)
    collections0, paused0 = gc_totals()
    windows: list[dict[str, float]] = []
    values: list[float] = []
    counts: list[int] = []
    received = 0
    per_listener: list[int] = []
    for _ in range(repeats):
        for proc in procs:
            await proc.call("reset")
        sfu.take_latencies()
        sent0 = sfu.sent()
        cpu0 = cpu_seconds()
        wall0 = time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1 = cpu_seconds()
        wall1 = time.perf_counter()
        sent1 = sfu.sent()
        window_values, window_counts = sfu.take_latencies()
        values.extend(window_values)
        counts.extend(window_counts)
        received = 0
        per_listener = []
        for proc in procs:
            _, packets, _nbytes, each = await proc.call("counts")
            received += packets
            per_listener.extend(each)
        windows.append(
            {"sent": sent1 - sent0, "cpu": cpu1 - cpu0, "wall": wall1 - wall0, "rx": received}
        )
    collections, paused = gc_totals()
    sent = sum(w["sent"] for w in windows)
    wall = sum(w["wall"] for w in windows)
    cpu = sum(w["cpu"] for w in windows)
    offered = listeners * speakers * wall / PTIME
    per_window = [w["cpu"] / w["sent"] * 1e6 for w in windows if w["sent"]]
    us = statistics.median(per_window) if per_window else float("nan")
    p50, p90, p99 = weighted_percentiles(values, counts, (0.5, 0.9, 0.99))
    return {
        "sfu": sfu.name,
        "listeners": listeners,
        "speakers": speakers,
        "seconds": round(wall, 2),
        "sent": int(sent),
        "offered": int(offered),
        "delivered_ratio": round(sent / offered, 3) if offered else 0.0,
        "received_by_listeners_last_window": received,
        "listeners_receiving": sum(1 for c in per_listener if c > 0),
        "cpu_s": round(cpu, 3),
        "cpu_share": round(cpu / wall, 3),
        "us_per_listener_packet": round(us, 2),
        "us_per_window": [round(x, 2) for x in per_window],
        "pps_per_core": round(1e6 / us) if per_window else 0,
        "forward_p50_ms": round(p50 * 1e3, 3),
        "forward_p90_ms": round(p90 * 1e3, 3),
        "forward_p99_ms": round(p99 * 1e3, 3),
        "full_collection_before_ms": round(full_collection_ms, 1),
        "gc_pauses": int(collections - collections0),
        "gc_pause_total_ms": round((paused - paused0) * 1e3, 2),
        "latency_values": values,
        "latency_counts": counts,
    }


track_gc_pauses()


def gc_totals() -> tuple[float, float]:
    """Garbage collections of this process so far: ``(count, seconds)``."""
    count = paused = 0.0
    for generation in ("0", "1", "2"):
        labels = {"generation": generation}
        count += REGISTRY.get_sample_value("spaces_gc_pause_seconds_count", labels) or 0.0
        paused += REGISTRY.get_sample_value("spaces_gc_pause_seconds_sum", labels) or 0.0
    return count, paused


async def idle_cpu_share(seconds: float) -> float:
    """CPU share of this process over ``seconds`` (with nobody speaking: the control
    plane — ICE consent, RTCP, timers — of the connected sessions)."""
    cpu0 = cpu_seconds()
    wall0 = time.perf_counter()
    await asyncio.sleep(seconds)
    return (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)


def summary_line(row: dict[str, Any]) -> str:
    return (
        f"{row['sfu']:>6} {row['listeners']:>5} listeners, {row['speakers']} speaker(s): "
        f"{row['us_per_listener_packet']:8.2f} µs/listener-packet, "
        f"{row['pps_per_core']:>8} pps/core, "
        f"p50 {row['forward_p50_ms']:7.3f} ms, p99 {row['forward_p99_ms']:7.3f} ms, "
        f"delivered {row['delivered_ratio']:.3f}, cpu {row['cpu_share']:.2f} core"
        + (f", idle {row['idle_cpu_share']:.3f} core" if row.get("idle_cpu_share") else "")
    )


async def grow(
    sfu: FastSfu | StockSfu,
    procs: list[PeerProcess],
    target: int,
    batch: int,
) -> int:
    """Connect listeners until ``target`` are connected, spread over the processes, a
    batch at a time with a pause between (joins cost every process CPU, and a starved
    peer answers ICE consent checks too late)."""
    connected = sum(p.count for p in procs)
    while connected < target:
        step = min(batch * len(procs), target - connected)
        shares = [
            step // len(procs) + (1 if i < step % len(procs) else 0) for i in range(len(procs))
        ]
        results = await asyncio.gather(
            *(p.connect(n, False, sfu.answer) for p, n in zip(procs, shares, strict=True) if n)
        )
        connected += step
        if sum(results) < step:
            logger.warning("%s: only %d of %d listeners connected", sfu.name, sum(results), step)
        await asyncio.sleep(GROW_PAUSE)
    return connected


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = (
        ("fast", "o-"),
        ("fast-all", "^"),
        ("fast-libsrtp", "x"),
        ("fast-unsplit", "+"),
        ("stock", "s--"),
    )
    for name, style in styles:
        subset = [r for r in rows if r["sfu"] == name]
        if subset:
            left.plot(
                [r["listeners"] for r in subset],
                [r["us_per_listener_packet"] for r in subset],
                style,
                label=f"{name} ({subset[0]['speakers']} speaker(s))",
            )
    left.set_xlabel("listeners")
    left.set_ylabel("CPU µs per forwarded listener-packet")
    left.set_yscale("log")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    left.set_title("CPU per listener-packet (SFU process)")
    for name in ("fast", "fast-all", "stock"):
        subset = [r for r in rows if r["sfu"] == name and r["latency_values"]]
        if not subset:
            continue
        row = subset[-1]
        v = np.asarray(row["latency_values"]) * 1e3
        w = np.asarray(row["latency_counts"], dtype=np.float64)
        order = np.argsort(v)
        right.plot(
            v[order],
            np.cumsum(w[order]) / w.sum(),
            label=f"{name} @ {row['listeners']} listeners, {row['speakers']} speaker(s)",
        )
    right.set_xscale("log")
    right.set_xlabel("forwarding latency (ms)")
    right.set_ylabel("fraction of listener-packets")
    right.axvline(5.0, color="grey", linestyle=":", label="5 ms")
    right.grid(True, which="both", alpha=0.3)
    right.legend()
    right.set_title("Forwarding latency distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loopback_only()
    tones = [encode_tone(300.0 + 110.0 * i) for i in range(max(args.speakers, 1))]
    ctx = mp.get_context("spawn")
    procs = [PeerProcess(ctx, tones) for _ in range(args.listener_procs)]
    speaker_proc = PeerProcess(ctx, tones)
    rows: list[dict[str, Any]] = []
    FORWARD_LATENCY.samples = LatencySamples()
    try:
        # Fast path: one speaker at every step, as the stock SFU has; at the largest count,
        # all the speakers too.
        fast = FastSfu(args.threads, args.chunk, args.split, args.native_srtp)
        await fast.start()
        await speaker_proc.connect(1, True, fast.publish)
        for count in args.steps:
            await grow(fast, procs, count, args.batch)
            row = await measure(fast, procs, count, 1, args.warmup, args.seconds, args.repeats)
            stats = fast.engine.stats()
            row["engine_publishers"] = stats.publishers
            row["engine_listeners"] = stats.listeners
            print(summary_line(row), flush=True)
            rows.append(row)
        # Nobody speaking: what the connected sessions cost by themselves (ICE consent,
        # RTCP, timers), measured before the backlog a full stage may leave behind.
        fast.engine.update_permissions(fast.space, fast.speakers[0], may_publish=True, muted=True)
        await asyncio.sleep(args.warmup)
        idle = await idle_cpu_share(args.seconds)
        for row in rows:
            row["idle_cpu_share"] = round(idle, 3) if row["listeners"] == args.steps[-1] else None
        if args.speakers > 1:
            fast.engine.update_permissions(fast.space, fast.speakers[0], may_publish=True)
            await speaker_proc.connect(args.speakers - 1, True, fast.publish, first=1)
            row = await measure(
                fast, procs, args.steps[-1], args.speakers, args.warmup, args.seconds, args.repeats
            )
            row["sfu"] = "fast-all"
            row["idle_cpu_share"] = round(idle, 3)
            print(summary_line(row), flush=True)
            rows.append(row)
        await speaker_proc.call("close")
        print(f"fast idle (listeners connected, nobody speaking): {idle:.3f} core", flush=True)
        for proc in procs:
            await proc.call("close")
            proc.count = 0
        await fast.close()

        # Ablations: the same fast path at the largest count with one speaker, with one
        # part taken out: libsrtp protecting every listener instead of the native AES-GCM,
        # each fan-out sent from the egress thread alone, or consent kept on the event
        # loop instead of the consent plane's thread.
        ablations: list[tuple[str, int, bool, bool]] = []
        if args.libsrtp_row and args.native_srtp:
            ablations.append(("fast-libsrtp", args.split, False, True))
        if args.unsplit_row and args.split > 1:
            ablations.append(("fast-unsplit", 1, args.native_srtp, True))
        if args.loop_consent_row:
            ablations.append(("fast-loop-consent", args.split, args.native_srtp, False))
        for name, split, native_srtp, consent_plane in ablations:
            ablation = FastSfu(args.threads, args.chunk, split, native_srtp, consent_plane)
            await ablation.start()
            await speaker_proc.connect(1, True, ablation.publish)
            await grow(ablation, procs, args.steps[-1], args.batch)
            row = await measure(
                ablation, procs, args.steps[-1], 1, args.warmup, args.seconds, args.repeats
            )
            row["sfu"] = name
            await speaker_proc.call("close")
            await asyncio.sleep(args.warmup)
            row["idle_cpu_share"] = round(await idle_cpu_share(args.seconds), 3)
            print(summary_line(row), flush=True)
            rows.append(row)
            for proc in procs:
                await proc.call("close")
                proc.count = 0
            await ablation.close()

        # Stock aiortc, up to the largest listener count it keeps up with.
        stock = StockSfu(tones[: args.stock_speakers])
        await stock.start()
        for count in args.stock_steps:
            await grow(stock, procs, count, args.batch)
            row = await measure(
                stock, procs, count, args.stock_speakers, args.warmup, args.seconds, args.repeats
            )
            print(summary_line(row), flush=True)
            rows.append(row)
            if not sustained(row):
                print(f"stock aiortc no longer keeps up at {count} listeners", flush=True)
                break
        for proc in procs:
            await proc.call("close")
        await stock.close()
        for proc in [*procs, speaker_proc]:
            await proc.call("exit")
    finally:
        for proc in [*procs, speaker_proc]:
            proc.stop()
    return report(rows, args)


def sustained(row: dict[str, Any]) -> bool:
    """Whether an SFU kept up: (nearly) everything offered was sent, without a backlog."""
    return bool(row["delivered_ratio"] >= 0.95 and row["forward_p99_ms"] < 200)


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    fast_rows = [r for r in rows if r["sfu"] == "fast"]
    fast = fast_rows[-1]
    full = next((r for r in rows if r["sfu"] == "fast-all"), None)
    libsrtp = next((r for r in rows if r["sfu"] == "fast-libsrtp"), None)
    unsplit = next((r for r in rows if r["sfu"] == "fast-unsplit"), None)
    loop_consent = next((r for r in rows if r["sfu"] == "fast-loop-consent"), None)
    stock_rows = [r for r in rows if r["sfu"] == "stock"]
    kept_up = [r for r in stock_rows if sustained(r)] or stock_rows
    stock = kept_up[-1] if kept_up else None
    results_dir = Path(os.environ.get("BENCH_RESULTS_DIR", ROOT / "bench" / "results"))
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_path = results_dir / "media_fanout.png"
    plot(rows, plot_path)
    idle = fast.get("idle_cpu_share")

    def control_plane(row: dict[str, Any]) -> float | None:
        if idle is None or not row["sent"]:
            return None
        rate = float(row["sent"]) / float(row["seconds"])
        return round(float(idle) / rate * 1e6, 2)

    return {
        "listeners": fast["listeners"],
        "speakers": 1,
        "slots": SLOTS,
        "egress_threads": args.threads,
        "egress_split": args.split,
        "receive_steered": STEERING.peer_cpus is not None,
        "fast_us_per_listener_packet": fast["us_per_listener_packet"],
        "fast_pps_per_core": fast["pps_per_core"],
        "fast_forward_p50_ms": fast["forward_p50_ms"],
        "fast_forward_p99_ms": fast["forward_p99_ms"],
        "fast_delivered_ratio": fast["delivered_ratio"],
        "fast_cpu_share": fast["cpu_share"],
        "fast_idle_cpu_share": idle,
        "fast_control_plane_us_per_listener_packet": control_plane(fast),
        "fast_all_speakers": args.speakers,
        "fast_all_speakers_us_per_listener_packet": full["us_per_listener_packet"]
        if full
        else None,
        "fast_all_speakers_pps_per_core": full["pps_per_core"] if full else None,
        "fast_all_speakers_forward_p50_ms": full["forward_p50_ms"] if full else None,
        "fast_all_speakers_forward_p99_ms": full["forward_p99_ms"] if full else None,
        "fast_all_speakers_delivered_ratio": full["delivered_ratio"] if full else None,
        "fast_all_speakers_control_plane_us_per_listener_packet": (
            control_plane(full) if full else None
        ),
        "fast_native_srtp": args.native_srtp,
        "fast_libsrtp_us_per_listener_packet": libsrtp["us_per_listener_packet"]
        if libsrtp
        else None,
        "fast_libsrtp_forward_p99_ms": libsrtp["forward_p99_ms"] if libsrtp else None,
        "fast_unsplit_us_per_listener_packet": unsplit["us_per_listener_packet"]
        if unsplit
        else None,
        "fast_unsplit_forward_p50_ms": unsplit["forward_p50_ms"] if unsplit else None,
        "fast_unsplit_forward_p99_ms": unsplit["forward_p99_ms"] if unsplit else None,
        **{
            f"fast_loop_consent_{key}": loop_consent[key] if loop_consent else None
            for key in ("us_per_listener_packet", "forward_p99_ms", "idle_cpu_share")
        },
        "stock_listeners": stock["listeners"] if stock else 0,
        "stock_speakers": args.stock_speakers,
        "stock_sustained": bool(stock and sustained(stock)),
        "stock_us_per_listener_packet": stock["us_per_listener_packet"] if stock else None,
        "stock_pps_per_core": stock["pps_per_core"] if stock else None,
        "stock_forward_p50_ms": stock["forward_p50_ms"] if stock else None,
        "stock_forward_p99_ms": stock["forward_p99_ms"] if stock else None,
        "stock_delivered_ratio": stock["delivered_ratio"] if stock else None,
        "cpu_ratio_stock_over_fast": (
            round(stock["us_per_listener_packet"] / fast["us_per_listener_packet"], 1)
            if stock
            else None
        ),
        "steps": [
            {k: v for k, v in r.items() if k not in ("latency_values", "latency_counts")}
            for r in rows
        ],
        "plot": str(plot_path),
    }


# -- profiling --------------------------------------------------------------------------


async def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Profile the fast path at the largest listener count (see the module docstring)."""
    loopback_only()
    tones = [encode_tone(300.0 + 110.0 * i) for i in range(max(args.speakers, 1))]
    ctx = mp.get_context("spawn")
    procs = [PeerProcess(ctx, tones) for _ in range(args.listener_procs)]
    speaker_proc = PeerProcess(ctx, tones)
    FORWARD_LATENCY.samples = LatencySamples()
    out: dict[str, Any] = {}
    count = args.steps[-1]
    try:
        fast = FastSfu(args.threads, args.chunk, args.split)
        await fast.start()

        await speaker_proc.connect(1, True, fast.publish)
        for step in args.steps:
            await grow(fast, procs, step, args.batch)
        base = await measure(fast, procs, count, 1, args.warmup, args.seconds, args.repeats)
        print(summary_line(base), flush=True)
        out["listeners"] = count
        out["us_per_listener_packet"] = base["us_per_listener_packet"]
        perf = shutil.which("perf")
        if perf is not None:
            out["perf"] = await run_perf(perf, args.seconds)
        out["cprofile"] = await run_cprofile(fast, args.seconds)
        await speaker_proc.call("close")
        await asyncio.sleep(1.0)
        out["idle_cpu_share"] = round(await idle_cpu_share(args.seconds), 3)
        idle_profile = await run_cprofile(fast, args.seconds)
        out["idle_cprofile_top_ms_per_second"] = {
            name: round(value / args.seconds, 2)
            for name, value in idle_profile["top_tottime_ms"].items()
        }
        out["loaded_listener_packets_per_s"] = round(base["sent"] / base["seconds"])
        for proc in procs:
            await proc.call("close")
        await fast.close()
        for proc in [*procs, speaker_proc]:
            await proc.call("exit")
    finally:
        for proc in [*procs, speaker_proc]:
            proc.stop()
    out["stages"] = stage_timing(count)
    return out


async def run_cprofile(fast: FastSfu, seconds: float) -> dict[str, Any]:
    """cProfile (CPU-time clock) on the event loop thread and every egress thread."""
    pool = fast.engine.pool
    assert pool is not None
    profilers: dict[int, cProfile.Profile] = {}

    def start() -> None:
        profiler = cProfile.Profile(time.thread_time)
        profilers[threading.get_ident()] = profiler
        profiler.enable()

    def stop() -> None:
        profilers[threading.get_ident()].disable()

    pool.call_on_workers(start)
    start()
    sent0 = fast.sent()
    await asyncio.sleep(seconds)
    stop()  # this thread's profiler; the workers stop their own
    pool.call_on_workers(stop)
    await fast.engine.flush()
    sent = fast.sent() - sent0
    first, *others = profilers.values()
    stats = pstats.Stats(first)
    for profiler in others:
        stats.add(profiler)
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(20)
    print(text.getvalue(), flush=True)
    entries = sorted(
        stats.stats.items(),  # type: ignore[attr-defined]
        key=lambda item: -item[1][2],
    )
    return {
        "listener_packets": int(sent),
        "top_tottime_us_per_listener_packet": {
            f"{Path(key[0]).name}:{key[1]}({key[2]})": round(value[2] / max(sent, 1) * 1e6, 3)
            for key, value in entries[:15]
        },
        "top_tottime_ms": {
            f"{Path(key[0]).name}:{key[1]}({key[2]})": round(value[2] * 1e3, 2)
            for key, value in entries[:15]
        },
    }


PERF_INCLUSIVE = (
    "__sys_sendmmsg",
    "net_rx_action",
    "srtp_protect_mki",
    "srtp_protect",
    "_PyEval_EvalFrameDefault",
    "__libc_recvmsg",
    "__sys_recvmsg",
)
"""Symbols whose inclusive share (with callees) the profile reports."""


async def run_perf(perf: str, seconds: float) -> dict[str, Any]:
    """Sample this process with ``perf`` (call graphs, while it keeps forwarding) and
    split the samples by shared object, by symbol, and inclusively for a few symbols
    (``__sys_sendmmsg`` is the whole send; ``net_rx_action`` the loopback receive path
    the kernel runs in the sender's context)."""
    data = Path(os.environ.get("TMPDIR", "/tmp")) / f"media_fanout_{os.getpid()}.perf"
    record = await asyncio.create_subprocess_exec(
        perf, "record", "-q", "-g", "-F", "999", "-p", str(os.getpid()), "-o", str(data),
        "--", "sleep", str(seconds),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.wait_for(record.wait(), seconds + 30)
    out: dict[str, Any] = {}
    reports = (
        ("by_object_pct", ["--no-children", "--sort", "dso"]),
        ("by_symbol_pct", ["--no-children", "--sort", "sym"]),
        ("inclusive_pct", ["--children", "--sort", "sym"]),
    )
    try:
        for key, options in reports:
            report_text = subprocess.run(
                [perf, "report", "-i", str(data), *options, "--stdio", "-q", "-g", "none"],
                check=True,
                capture_output=True,
                text=True,
                timeout=180,
            ).stdout
            shares: dict[str, float] = {}
            for line in report_text.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith("%"):
                    name = parts[-1]
                    if key == "inclusive_pct":
                        if name in PERF_INCLUSIVE:
                            shares[name] = float(parts[0].rstrip("%"))
                    else:
                        shares[" ".join(parts[1:])[:60]] = float(parts[0].rstrip("%"))
            out[key] = dict(sorted(shares.items(), key=lambda kv: -kv[1])[:15])
    except (subprocess.SubprocessError, OSError) as exc:
        out["error"] = str(exc)[:200]
    finally:
        data.unlink(missing_ok=True)
    return out


def stage_timing(listeners: int, rounds: int = 400) -> dict[str, float]:
    """Time each stage of the egress loop on real loopback sockets (µs per listener)."""
    from pylibsrtp import Policy, Session

    from services.media.egress import _SENDMMSG, EgressHandle, ShardPlan
    from services.media.srtp_fastpath import srtp_protect

    sinks = []
    for _ in range(listeners):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sinks.append(s)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    plan = ShardPlan(tx.fileno(), 64)
    for s in sinks:
        policy = Policy(
            key=os.urandom(44),
            ssrc_type=Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
        )
        policy.allow_repeat_tx = True
        policy.window_size = 1024
        plan.add(EgressHandle("s", Session(policy), tx.fileno(), s.getsockname()))
    packet = bytearray(12 + 80)
    packet[0], packet[1] = 0x80, 111
    copy = protect = send = 0.0
    chunks = plan._layout()
    for r in range(rounds):
        packet[2:4] = (r & 0xFFFF).to_bytes(2, "big")
        source = np.frombuffer(bytes(packet), dtype=np.uint8)
        size = len(packet)
        for a, b, srtps, pointers, lengths in chunks:
            t0 = time.process_time()
            plan.buffers.rows[a:b, :size] = source
            plan.buffers.lengths[a:b] = size
            t1 = time.process_time()
            list(map(srtp_protect, srtps, pointers, lengths))
            t2 = time.process_time()
            plan._iov_lengths[a:b] = plan.buffers.lengths[a:b]
            _SENDMMSG(plan.fd, plan._msgs + a, b - a, 0)
            t3 = time.process_time()
            copy += t1 - t0
            protect += t2 - t1
            send += t3 - t2
        for s in sinks[:: max(1, listeners // 50)]:
            try:
                while True:
                    s.recv(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
    total = rounds * listeners
    for s in [*sinks, tx]:
        s.close()
    return {
        "copy_us": round(copy / total * 1e6, 3),
        "srtp_protect_us": round(protect / total * 1e6, 3),
        "sendmmsg_us": round(send / total * 1e6, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=lambda s: [int(x) for x in s.split(",")], default=[100, 250, 500, 1000]
    )
    parser.add_argument(
        "--stock-steps", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200, 300]
    )
    parser.add_argument(
        "--speakers", type=int, default=3, help="speakers (fast path, at the largest count)"
    )
    parser.add_argument("--stock-speakers", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=MediaConfig().egress_threads,
        help="egress threads of the fast path (default: the engine's)",
    )
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument(
        "--split",
        type=int,
        default=MediaConfig().egress_split,
        help="threads each fan-out is split across (default: the engine's)",
    )
    parser.add_argument(
        "--unsplit-row",
        action="store_true",
        help="also run the fast path with unsplit fan-outs (largest count)",
    )
    parser.add_argument(
        "--libsrtp-row",
        action="store_true",
        help="also run the fast path with libsrtp for every listener (largest count)",
    )
    parser.add_argument(
        "--loop-consent-row",
        action="store_true",
        help="also run the fast path with consent on the event loop (largest count)",
    )
    parser.add_argument(
        "--native-srtp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the fast path's own AES-GCM (default) or libsrtp for every listener",
    )
    parser.add_argument("--listener-procs", type=int, default=2)
    parser.add_argument(
        "--batch", type=int, default=25, help="listeners connected at once per process"
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=4.0, help="one measuring window")
    parser.add_argument("--repeats", type=int, default=3, help="windows per step")
    parser.add_argument("--timeout", type=float, default=900.0, help="hard stop (seconds)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--steer",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep loopback receive work off the measured process (see the module docs)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"media_fanout exceeded {args.timeout:.0f} s")

    signal.signal(signal.SIGALRM, expire)
    # A plain `kill` still runs the finally below (rps_cpus restored).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.alarm(int(args.timeout))
    if args.steer:
        STEERING.apply()
    try:
        result = asyncio.run(profile(args) if args.profile else run(args))
    finally:
        STEERING.restore()
    signal.alarm(0)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
