"""Batched egress: one SRTP protect and one ``sendmmsg`` slot per listener and packet.

All muxed sessions share the ICE socket of :mod:`services.media.icemux`, so one
``sendmmsg(2)`` call can carry a packet to hundreds of listeners. For every forwarding
group an egress worker keeps a :class:`ShardPlan`: per listener a protect buffer, its
``sockaddr`` and an ``mmsghdr`` pointing at both, laid out once when the listener joins.
Forwarding a packet to the group is one call of the C loop (``native/fanout.c``, built by
``make``) which, per chunk of listeners, copies the shared plaintext into every
listener's buffer, protects it in place, and sends the chunk with one ``sendmmsg``, with
the GIL released; then the chunk goes into the counters and the latency histogram
(weighted by its size). Without a C compiler the same steps run in Python (numpy copies,
``map`` over the protect function, a cffi ``sendmmsg``).

A plan's listeners share one protect function: the fast path's own AES-GCM
(:mod:`services.media.srtp_native`, for AES-GCM profiles on AES-NI CPUs) or libsrtp's
``srtp_protect``; a worker keeps one plan per group, socket and protect function.

Workers are threads (``EgressPool(threads=N)``), each owning the listeners assigned to it,
so a listener's SRTP context is only ever used by one thread and no lock is taken on
the per-packet path. ``threads=0`` runs the same code inline (tests, tiny nodes).

Sessions whose ICE pair is not on the mux (a TURN-relayed pair) use a
:class:`FallbackSender`: aiortc's own protect-and-send, one queue per session.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import cffi  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
import pylibsrtp
from opentelemetry import trace

from services.media import native
from services.media.metrics import (
    BYTES_SENT,
    FORWARD_LATENCY,
    PACKETS_DROPPED,
    PACKETS_SENT,
    DropReason,
)
from services.media.srtp_fastpath import (
    SRTP_MAX_TRAILER,
    SRTP_PROTECT_ADDRESS,
    ProtectBuffers,
    srtp_protect,
    srtp_protect_holding_gil,
    srtp_session_address,
    srtp_session_pointer,
)
from services.media.srtp_native import GCM_PROTECT_ADDRESS, GcmSender
from services.media.srtp_native import protect_holding_gil as gcm_protect_holding_gil

logger = logging.getLogger(__name__)

_NATIVE: Any = native.MODULE
if _NATIVE is None:  # pragma: no cover - depends on the build
    logger.warning(
        "the native egress loop is not built (make builds it); forwarding runs in Python"
    )
_tracer = trace.get_tracer(__name__)

TRACE_EVERY = 5000
"""One fan-out in this many becomes a ``media.forward`` span (a sample of the packet path:
ingress to the last listener's send, with the fan-out size)."""

__all__ = [
    "MAX_PLAINTEXT",
    "EgressHandle",
    "EgressPool",
    "EgressWorker",
    "FallbackSender",
    "FanoutHelpers",
    "ShardPlan",
    "sockaddr_bytes",
]

STRIDE = 1536
"""Bytes per listener buffer: an Ethernet MTU's packet plus libsrtp's largest trailer."""
MAX_PLAINTEXT = STRIDE - SRTP_MAX_TRAILER
_SOCKADDR_MAX = 28  # sizeof(struct sockaddr_in6)

_FFI = cffi.FFI()
_FFI.cdef(
    """
    struct iovec { void *iov_base; size_t iov_len; };
    struct msghdr {
        void *msg_name; unsigned int msg_namelen;
        struct iovec *msg_iov; size_t msg_iovlen;
        void *msg_control; size_t msg_controllen; int msg_flags;
    };
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
    ssize_t sendto(int sockfd, const void *buf, size_t len, int flags,
                   const void *dest_addr, unsigned int addrlen);
    """
)
_LIBC: Any = _FFI.dlopen(None)
try:
    _SENDMMSG: Any = _LIBC.sendmmsg
except AttributeError:  # pragma: no cover - not Linux
    _SENDMMSG = None
_SENDTO: Any = _LIBC.sendto

_FANOUT, _JOIN, _LEAVE, _RTCP, _CALL, _STOP = range(6)


def sockaddr_bytes(address: tuple[str, int]) -> bytes:
    """``struct sockaddr_in`` / ``sockaddr_in6`` of an (IP, port) pair, as the kernel
    reads it (family in host order, port and address in network order)."""
    host, port = address[0], address[1]
    if ":" in host:
        return struct.pack("=H", socket.AF_INET6) + struct.pack(
            "!HI16sI", port, 0, socket.inet_pton(socket.AF_INET6, host), 0
        )
    return (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H4s", port, socket.inet_pton(socket.AF_INET, host))
        + b"\0" * 8
    )


class EgressHandle:
    """How to reach one listener on the fast path: its SRTP context and its address.

    :param session_id: the session's id (for logs).
    :param srtp: the session's outbound SRTP session (kept alive by the handle); it
        protects the RTCP, and the RTP too unless ``gcm`` is given.
    :param fd: the mux socket's file descriptor.
    :param address: the listener's (IP, port) of the nominated ICE pair.
    :param gcm: the fast path's own AES-GCM sender for this listener's RTP (see
        :mod:`services.media.srtp_native`); it then protects every RTP packet the
        listener gets, so its rollover counters and replay window stay whole.
    :ivar protect_address: the C protect function the fan-out calls for this listener.
    :ivar context_address: the context that function takes.
    """

    __slots__ = (
        "address",
        "context_address",
        "fd",
        "gcm",
        "protect_address",
        "session_id",
        "sockaddr",
        "srtp",
        "srtp_address",
        "srtp_ptr",
        "worker",
        "_name",
    )

    def __init__(
        self,
        session_id: str,
        srtp: pylibsrtp.Session,
        fd: int,
        address: tuple[str, int],
        gcm: GcmSender | None = None,
    ) -> None:
        self.session_id = session_id
        self.srtp = srtp
        self.srtp_ptr: Any = srtp_session_pointer(srtp)
        self.srtp_address = srtp_session_address(srtp)
        self.gcm = gcm
        if gcm is not None:
            self.protect_address = GCM_PROTECT_ADDRESS
            self.context_address = gcm.address
        else:
            self.protect_address = SRTP_PROTECT_ADDRESS
            self.context_address = self.srtp_address
        self.fd = fd
        self.address = address
        self.sockaddr = sockaddr_bytes(address)
        self._name: Any = _FFI.new("char[]", self.sockaddr)
        self.worker: EgressWorker | None = None

    def set_address(self, address: tuple[str, int]) -> None:
        """Send to another address from now on (the listener's ICE pair moved). Call on
        the owning worker while the handle is in no :class:`ShardPlan` (a plan copies
        the address when the handle is added); :meth:`EgressPool.readdress` does both."""
        self.address = address
        self.sockaddr = sockaddr_bytes(address)
        self._name = _FFI.new("char[]", self.sockaddr)

    def send_rtcp(self, plaintext: bytes) -> None:
        """Protect and send one RTCP compound packet (call from the owning worker only)."""
        data = self.srtp.protect_rtcp(plaintext)
        if _SENDTO(self.fd, data, len(data), 0, self._name, len(self.sockaddr)) < 0:
            PACKETS_DROPPED.labels(DropReason.SEND_FAILED).inc()


class ShardPlan:
    """The listeners of one forwarding group that one worker serves, laid out for
    ``sendmmsg``.

    :param fd: the mux socket to send from.
    :param chunk: listeners per ``sendmmsg`` call (a trade between latency of the first
        listeners and per-call overhead).
    :param hold_gil: protect without releasing the GIL (on an egress thread; see
        :mod:`services.media.srtp_fastpath`).
    :param protect_address: the protect function of every listener of the plan
        (:attr:`EgressHandle.protect_address`): libsrtp's or the native AES-GCM one.
    :param helpers: the native helper threads a fan-out is split across
        (:class:`FanoutHelpers`); ``None`` sends from the calling thread alone.
    """

    def __init__(
        self,
        fd: int,
        chunk: int,
        capacity: int = 8,
        hold_gil: bool = False,
        native: bool | None = None,
        protect_address: int = SRTP_PROTECT_ADDRESS,
        helpers: FanoutHelpers | None = None,
    ) -> None:
        self.fd = fd
        self.chunk = chunk
        self.protect_address = protect_address
        libsrtp = protect_address == SRTP_PROTECT_ADDRESS
        # The Python loop calls the native AES-GCM protect through ctypes (addresses).
        self.hold_gil = hold_gil or not libsrtp
        self.native = _NATIVE is not None if native is None else native
        if self.native and _NATIVE is None:
            raise RuntimeError("the native egress loop is not built")
        # The C loop takes NULL for "no helpers"; the Python loop never looks.
        self._pool: Any = (
            helpers.pool if helpers is not None and self.native else _NATIVE and _NATIVE.ffi.NULL
        )
        if libsrtp:
            self._protect: Any = srtp_protect_holding_gil if self.hold_gil else srtp_protect
        else:
            self._protect = gcm_protect_holding_gil
        self.handles: list[EgressHandle] = []
        self._index: dict[EgressHandle, int] = {}
        self._srtp_ptrs: list[Any] = []
        self._chunks: list[tuple[int, int, list[Any], list[Any], list[Any]]] | None = None
        self._until_trace = TRACE_EVERY
        self._allocate(capacity)

    def __len__(self) -> int:
        return len(self.handles)

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffers = ProtectBuffers(capacity, STRIDE)
        self._names: Any = _FFI.new("char[]", capacity * _SOCKADDR_MAX)
        self._iov: Any = _FFI.new("struct iovec[]", capacity)
        self._msgs: Any = _FFI.new("struct mmsghdr[]", capacity)
        self._iov_lengths: npt.NDArray[np.uint64] = np.frombuffer(
            _FFI.buffer(self._iov), dtype=np.uint64
        ).reshape(capacity, 2)[:, 1]
        for i in range(capacity):
            self._iov[i].iov_base = _FFI.cast("void *", self.buffers.address(i))
            header = self._msgs[i].msg_hdr
            header.msg_iov = self._iov + i
            header.msg_iovlen = 1
            header.msg_name = self._names + i * _SOCKADDR_MAX
        # The native loop's view of the same memory: addresses, and its own out-arrays.
        self._sessions: Any = _FFI.new("uintptr_t[]", capacity)
        self._sessions_address = _address(self._sessions)
        self._buffers_address = self.buffers.address(0)
        self._lengths_address = self.buffers.length_addresses[0]
        self._msgs_address = _address(self._msgs)
        chunks = capacity // max(1, self.chunk) + 1
        self._chunk_done: Any = _FFI.new("double[]", chunks)
        self._chunk_sent: Any = _FFI.new("int[]", chunks)
        self._totals: Any = _FFI.new("long[4]")
        if self.native:
            self._native_out = (
                _NATIVE.ffi.cast("double *", _address(self._chunk_done)),
                _NATIVE.ffi.cast("int *", _address(self._chunk_sent)),
                _NATIVE.ffi.cast("long *", _address(self._totals)),
            )
        for i, handle in enumerate(self.handles):
            self._place(i, handle)

    def _place(self, index: int, handle: EgressHandle) -> None:
        _FFI.memmove(self._names + index * _SOCKADDR_MAX, handle.sockaddr, len(handle.sockaddr))
        self._msgs[index].msg_hdr.msg_namelen = len(handle.sockaddr)
        self._sessions[index] = handle.context_address

    def add(self, handle: EgressHandle) -> None:
        """Add a listener (no-op if present)."""
        if handle in self._index:
            return
        if len(self.handles) == self.capacity:
            self._allocate(self.capacity * 2)
        index = len(self.handles)
        self.handles.append(handle)
        if handle.protect_address != self.protect_address:
            raise ValueError("the listener's protect function is not the plan's")
        self._srtp_ptrs.append(handle.context_address if self.hold_gil else handle.srtp_ptr)
        self._index[handle] = index
        self._place(index, handle)
        self._chunks = None

    def remove(self, handle: EgressHandle) -> None:
        """Remove a listener (no-op if absent); the last one takes its place."""
        index = self._index.pop(handle, None)
        if index is None:
            return
        last = self.handles.pop()
        last_ptr = self._srtp_ptrs.pop()
        if last is not handle:
            self.handles[index] = last
            self._srtp_ptrs[index] = last_ptr
            self._index[last] = index
            self._place(index, last)
        self._chunks = None

    def _layout(self) -> list[tuple[int, int, list[Any], list[Any], list[Any]]]:
        if self.hold_gil:
            pointers: list[Any] = self.buffers.addresses
            lengths: list[Any] = self.buffers.length_addresses
        else:
            pointers = self.buffers.pointers
            lengths = self.buffers.length_pointers
        count = len(self.handles)
        self._chunks = [
            (
                a,
                min(a + self.chunk, count),
                self._srtp_ptrs[a : a + self.chunk],
                pointers[a : min(a + self.chunk, count)],
                lengths[a : min(a + self.chunk, count)],
            )
            for a in range(0, count, self.chunk)
        ]
        return self._chunks

    def fanout(self, packet: bytes, received: float) -> tuple[int, int]:
        """Protect and send ``packet`` to every listener of the plan.

        :param received: when the publisher's packet arrived (``time.perf_counter()``).
        :returns: ``(packets sent, bytes sent)``.
        """
        size = len(packet)
        if not self.handles:
            return 0, 0
        if size > MAX_PLAINTEXT:
            PACKETS_DROPPED.labels(DropReason.TOO_LARGE).inc(len(self.handles))
            return 0, 0
        if self.native:
            sent_total, bytes_total = self._fanout_native(packet, received)
        else:
            sent_total, bytes_total = self._fanout_python(packet, received)
        self._until_trace -= 1
        if self._until_trace <= 0:
            self._until_trace = TRACE_EVERY
            _trace_fanout(received, sent_total, bytes_total, len(self.handles))
        return sent_total, bytes_total

    def _fanout_native(self, packet: bytes, received: float) -> tuple[int, int]:
        """The whole fan-out in one call of the C loop (the GIL is released inside),
        split across the helper threads if there are any."""
        done, chunk_sent, totals = self._native_out
        chunks = _NATIVE.lib.spaces_fanout(
            self._pool,
            self.protect_address,
            self.fd,
            self._sessions_address,
            self._buffers_address,
            STRIDE,
            self._lengths_address,
            self._msgs_address,
            len(self.handles),
            self.chunk,
            packet,
            len(packet),
            done,
            chunk_sent,
            totals,
        )
        observe = FORWARD_LATENCY.observe
        for k in range(chunks):
            if chunk_sent[k]:
                observe(done[k] - received, chunk_sent[k])
        if totals[2]:
            PACKETS_DROPPED.labels(DropReason.SRTP).inc(totals[2])
        if totals[3]:
            PACKETS_DROPPED.labels(DropReason.SEND_FAILED).inc(totals[3])
        return int(totals[0]), int(totals[1])

    def _fanout_python(self, packet: bytes, received: float) -> tuple[int, int]:
        """The same loop in Python (when the native module is not built)."""
        size = len(packet)
        chunks = self._chunks if self._chunks is not None else self._layout()
        source = np.frombuffer(packet, dtype=np.uint8)
        rows = self.buffers.rows
        lengths = self.buffers.lengths
        iov_lengths = self._iov_lengths
        perf_counter = time.perf_counter
        observe = FORWARD_LATENCY.observe
        protect = self._protect
        sent_total = 0
        bytes_total = 0
        for a, b, srtp_ptrs, pointers, length_pointers in chunks:
            rows[a:b, :size] = source
            lengths[a:b] = size
            errors = list(map(protect, srtp_ptrs, pointers, length_pointers))
            iov_lengths[a:b] = lengths[a:b]
            if any(errors):
                sent, nbytes = self._send_skipping(a, b, errors)
            else:
                sent = self._send(a, b)
                # Listeners of one chunk almost always share an SRTP profile (so a
                # protected length); counting that way spares a sum per chunk.
                nbytes = sent * int(lengths[a])
            if sent:
                observe(perf_counter() - received, sent)
            sent_total += sent
            bytes_total += nbytes
        return sent_total, bytes_total

    def _bytes(self, a: int, b: int) -> int:
        return int(self.buffers.lengths[a:b].sum())

    def _send(self, a: int, b: int) -> int:
        """``sendmmsg`` messages ``a`` to ``b``; returns how many left."""
        if _SENDMMSG is None:  # pragma: no cover - not Linux
            return self._send_each(a, b)
        sent = 0
        offset = a
        while offset < b:
            result = _SENDMMSG(self.fd, self._msgs + offset, b - offset, 0)
            if result > 0:
                sent += result
                offset += result
                continue
            code = _FFI.errno
            if code == errno.EINTR:
                continue
            if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                PACKETS_DROPPED.labels(DropReason.SEND_FAILED).inc(b - offset)
                break
            # This message's destination was refused; skip it and go on.
            PACKETS_DROPPED.labels(DropReason.SEND_FAILED).inc()
            offset += 1
        return sent

    def _send_each(self, a: int, b: int) -> int:  # pragma: no cover - not Linux
        sent = 0
        for i in range(a, b):
            header = self._msgs[i].msg_hdr
            result = _SENDTO(
                self.fd,
                self._iov[i].iov_base,
                self._iov[i].iov_len,
                0,
                header.msg_name,
                header.msg_namelen,
            )
            if result >= 0:
                sent += 1
            else:
                PACKETS_DROPPED.labels(DropReason.SEND_FAILED).inc()
        return sent

    def _send_skipping(self, a: int, b: int, errors: list[int]) -> tuple[int, int]:
        """Send the messages whose protection succeeded, in runs between failures."""
        PACKETS_DROPPED.labels(DropReason.SRTP).inc(sum(1 for e in errors if e))
        sent = 0
        nbytes = 0
        run_start: int | None = None
        for i, error in enumerate([*errors, 1]):
            if not error and run_start is None:
                run_start = a + i
            elif error and run_start is not None:
                count = self._send(run_start, a + i)
                sent += count
                nbytes += self._bytes(run_start, run_start + count)
                run_start = None
        return sent, nbytes


class FanoutHelpers:
    """Native threads that share a worker's fan-outs (``native/fanout.c``).

    A fan-out to more than one chunk of listeners is cut into runs of whole chunks: the
    worker's thread sends the first and each helper one other, at the same time, and the
    call returns when all are sent. The helpers are pthreads that never run Python, so
    they wait for no GIL; they exist to cut the time until the last listener's packet
    leaves (the forwarding latency's tail), not the CPU per packet. They are kept off the
    CPU the worker's thread runs on (else the scheduler often wakes them there, and the
    runs take turns), and a fan-out uses no more threads than there are CPUs.

    :param helpers: threads to start besides the worker's own.
    :param fds: a socket for each helper to send on (:meth:`IceMux.send_sockets
        <services.media.icemux.IceMux.send_sockets>`); helpers without one send on the
        plan's.
    """

    def __init__(self, helpers: int, fds: Sequence[int] = ()) -> None:
        if _NATIVE is None:
            raise RuntimeError("the native egress loop is not built")
        self.pool: Any = _NATIVE.lib.spaces_fanout_pool_new(helpers)
        if self.pool == _NATIVE.ffi.NULL:
            raise RuntimeError("could not start the fan-out helper threads")
        for index, fd in enumerate(fds[: len(self)]):
            _NATIVE.lib.spaces_fanout_pool_set_fd(self.pool, index, fd)

    def __len__(self) -> int:
        return int(_NATIVE.lib.spaces_fanout_pool_size(self.pool))

    @property
    def parts(self) -> int:
        """Threads a fan-out is split across at most: the caller and the helpers, but
        no more than the CPUs this process may use."""
        return int(_NATIVE.lib.spaces_fanout_pool_parts(self.pool))

    def close(self) -> None:
        """Stop the threads (no fan-out may be running or start after this)."""
        if self.pool != _NATIVE.ffi.NULL:
            _NATIVE.lib.spaces_fanout_pool_free(self.pool)
            self.pool = _NATIVE.ffi.NULL


class EgressWorker:
    """Owns some listeners' egress state and serves jobs for them in order.

    :param index: the worker's number (thread name).
    :param chunk: listeners per ``sendmmsg``.
    :param threaded: run jobs on a thread of its own; otherwise inline in ``submit``.
    :param split: threads each fan-out is split across: this worker's own and
        ``split - 1`` :class:`FanoutHelpers` (only with the native loop).
    :param send_fds: sockets to send RTP on, the worker's first, then one per helper
        (all on the mux's address and port, polled by nobody); without them, plans send
        on the listeners' mux socket.
    """

    def __init__(
        self,
        index: int,
        chunk: int,
        threaded: bool,
        split: int = 1,
        send_fds: Sequence[int] = (),
    ) -> None:
        self.index = index
        self.chunk = chunk
        self.load = 0
        self.send_fd: int | None = send_fds[0] if send_fds else None
        self.helpers = (
            FanoutHelpers(split - 1, send_fds[1:]) if split > 1 and _NATIVE is not None else None
        )
        # group id -> (socket, protect function) -> plan
        self._plans: dict[int, dict[tuple[int, int], ShardPlan]] = {}
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(
                target=self._run, name=f"media-egress-{index}", daemon=True
            )
            self._thread.start()

    def submit(self, job: tuple[Any, ...]) -> None:
        """Queue a job (or run it now, when not threaded)."""
        if self._thread is not None:
            self._queue.put(job)
        else:
            self._process(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job[0] == _STOP:
                return
            try:
                self._process(job)
            except Exception:
                logger.exception("egress worker %d failed a job", self.index)

    def _process(self, job: tuple[Any, ...]) -> None:
        kind = job[0]
        if kind == _FANOUT:
            plans = self._plans.get(job[1])
            if plans:
                sent = 0
                nbytes = 0
                for plan in plans.values():
                    count, size = plan.fanout(job[2], job[3])
                    sent += count
                    nbytes += size
                if sent:
                    PACKETS_SENT.inc(sent)
                    BYTES_SENT.inc(nbytes)
        elif kind == _JOIN:
            self._join(job[1], job[2])
        elif kind == _LEAVE:
            self._leave(job[1], job[2])
        elif kind == _RTCP:
            for handle, plaintext in job[1]:
                handle.send_rtcp(plaintext)
        elif kind == _CALL:
            job[1]()

    def _join(self, group_id: int, handle: EgressHandle) -> None:
        plans = self._plans.setdefault(group_id, {})
        key = (handle.fd, handle.protect_address)
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = ShardPlan(
                handle.fd if self.send_fd is None else self.send_fd,
                self.chunk,
                hold_gil=self._thread is not None,
                protect_address=handle.protect_address,
                helpers=self.helpers,
            )
        plan.add(handle)

    def _leave(self, group_id: int, handle: EgressHandle) -> None:
        plans = self._plans.get(group_id, {})
        key = (handle.fd, handle.protect_address)
        plan = plans.get(key)
        if plan is not None:
            plan.remove(handle)
            if not plan.handles:
                del plans[key]
            if not plans:
                self._plans.pop(group_id, None)

    def listeners(self) -> int:
        """Listener slots laid out on this worker (call from the worker, or after
        :meth:`EgressPool.flush`)."""
        return sum(len(plan) for plans in self._plans.values() for plan in plans.values())

    def stop(self) -> None:
        """Finish queued jobs and end the thread (and the fan-out helpers)."""
        if self._thread is not None:
            self._queue.put((_STOP,))
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                # Still in a job: its fan-out may be using the helpers, so they stay.
                logger.warning("egress worker %d did not stop in time", self.index)
                return
            self._thread = None
        if self.helpers is not None:
            self.helpers.close()
            self.helpers = None


class EgressPool:
    """The egress workers of an engine and which of them serve which group.

    :param threads: worker threads; 0 runs one worker inline.
    :param chunk: listeners per ``sendmmsg`` call.
    :param split: threads each worker's fan-outs are split across (see
        :class:`FanoutHelpers`); 1 sends from the worker alone.
    :param send_sockets: makes ``n`` sockets to send on (:meth:`IceMux.send_sockets
        <services.media.icemux.IceMux.send_sockets>`): the pool asks for ``split`` per
        worker, and without them (or all of them) plans send on the listeners' socket.
    """

    def __init__(
        self,
        threads: int,
        chunk: int,
        split: int = 1,
        send_sockets: Callable[[int], Sequence[int]] | None = None,
    ) -> None:
        count = max(1, threads)
        send_fds = send_sockets(count * split) if send_sockets is not None else ()
        per_worker = split if len(send_fds) == count * split else 0
        self.workers = [
            EgressWorker(
                i,
                chunk,
                threaded=threads > 0,
                split=split,
                send_fds=send_fds[i * per_worker : (i + 1) * per_worker],
            )
            for i in range(count)
        ]
        self._group_workers: dict[int, dict[EgressWorker, int]] = {}

    def attach(self, handle: EgressHandle) -> None:
        """Give a new listener to the least loaded worker (for its whole life)."""
        worker = min(self.workers, key=lambda w: w.load)
        worker.load += 1
        handle.worker = worker

    def detach(self, handle: EgressHandle) -> None:
        """Forget a listener (after it has left every group)."""
        if handle.worker is not None:
            handle.worker.load -= 1

    def join(self, group_id: int, handle: EgressHandle) -> None:
        """Start forwarding ``group_id``'s packets to the listener."""
        worker = handle.worker
        assert worker is not None, "attach() the handle first"
        counts = self._group_workers.setdefault(group_id, {})
        counts[worker] = counts.get(worker, 0) + 1
        worker.submit((_JOIN, group_id, handle))

    def leave(self, group_id: int, handle: EgressHandle) -> None:
        """Stop forwarding ``group_id``'s packets to the listener."""
        worker = handle.worker
        assert worker is not None
        counts = self._group_workers.get(group_id)
        if counts is not None and worker in counts:
            counts[worker] -= 1
            if counts[worker] <= 0:
                del counts[worker]
            if not counts:
                del self._group_workers[group_id]
        worker.submit((_LEAVE, group_id, handle))

    def readdress(
        self, handle: EgressHandle, address: tuple[str, int], group_id: int | None
    ) -> None:
        """Send a listener's packets to a new address (after an ICE restart or a NAT
        rebinding moved its session).

        On the listener's worker and in order with its other jobs, the handle leaves its
        group's plan, takes the address and joins again (so the plan lays out the new
        ``sockaddr``); fan-outs queued before still go to the old address.

        :param group_id: the group the listener is in now, if any.
        """
        worker = handle.worker
        if worker is None:
            handle.set_address(address)
            return
        if group_id is not None:
            worker.submit((_LEAVE, group_id, handle))
        worker.submit((_CALL, lambda: handle.set_address(address)))
        if group_id is not None:
            worker.submit((_JOIN, group_id, handle))

    def fanout(self, group_id: int, packet: bytes, received: float) -> None:
        """Forward ``packet`` to every fast-path listener of the group."""
        workers = self._group_workers.get(group_id)
        if workers:
            for worker in workers:
                worker.submit((_FANOUT, group_id, packet, received))

    def send_rtcp(self, handle: EgressHandle, plaintext: bytes) -> None:
        """Protect and send RTCP to a listener, on the worker that owns its SRTP."""
        self.send_rtcp_batch([(handle, plaintext)])

    def send_rtcp_batch(self, reports: list[tuple[EgressHandle, bytes]]) -> None:
        """:meth:`send_rtcp` for many listeners: one job per worker (a thread wake-up
        per batch, not per report)."""
        jobs: dict[EgressWorker, list[tuple[EgressHandle, bytes]]] = {}
        for handle, plaintext in reports:
            if handle.worker is not None:
                jobs.setdefault(handle.worker, []).append((handle, plaintext))
        for worker, batch in jobs.items():
            worker.submit((_RTCP, batch))

    def call_on_workers(self, function: Callable[[], None]) -> None:
        """Run ``function`` on every worker (its thread), after the jobs queued so far;
        for diagnostics such as per-thread profiling."""
        for worker in self.workers:
            worker.submit((_CALL, function))

    async def flush(self) -> None:
        """Wait until every job queued so far has been served."""
        loop = asyncio.get_running_loop()
        waits = []
        for worker in self.workers:
            done = loop.create_future()

            def finish(fut: asyncio.Future[None] = done) -> None:
                loop.call_soon_threadsafe(_resolve, fut)

            worker.submit((_CALL, finish))
            waits.append(done)
        await asyncio.gather(*waits)

    def close(self) -> None:
        """Stop the worker threads (queued jobs are served first)."""
        for worker in self.workers:
            worker.stop()


def _address(pointer: Any) -> int:
    """The address of a cffi pointer, as an int."""
    return int(_FFI.cast("uintptr_t", pointer))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class FallbackSender:
    """Forwarding to one listener through aiortc's own send path (protect, ICE send).

    Used when the listener's ICE pair is not on the mux (for instance a TURN relay). One
    bounded queue and one task per such listener keep its packets in order.

    :param send: aiortc's ``RTCDtlsTransport._send_rtp`` of the session.
    :param limit: packets queued before new ones are dropped.
    """

    def __init__(self, send: Callable[[bytes], Awaitable[None]], limit: int = 200) -> None:
        self._send = send
        self._queue: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue(limit)
        self._task = asyncio.create_task(self._run())

    def push(self, packet: bytes, received: float) -> None:
        """Queue one RTP or RTCP packet (plaintext)."""
        try:
            self._queue.put_nowait((packet, received))
        except asyncio.QueueFull:
            PACKETS_DROPPED.labels(DropReason.FALLBACK_BACKLOG).inc()

    async def _run(self) -> None:
        while True:
            packet, received = await self._queue.get()
            try:
                await self._send(packet)
            except ConnectionError:
                PACKETS_DROPPED.labels(DropReason.SEND_FAILED).inc()
                continue
            if received > 0:
                PACKETS_SENT.inc()
                # The protected length is not visible here: count the plaintext plus the
                # largest SRTP tag.
                BYTES_SENT.inc(len(packet) + 16)
                FORWARD_LATENCY.observe(time.perf_counter() - received)

    async def close(self) -> None:
        """Stop sending (queued packets are dropped)."""
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


def _trace_fanout(received: float, sent: int, nbytes: int, listeners: int) -> None:
    """Record one sampled fan-out as a span from the packet's arrival to now."""
    now_ns = time.time_ns()
    start_ns = now_ns - int((time.perf_counter() - received) * 1e9)
    span = _tracer.start_span("media.forward", start_time=start_ns)
    span.set_attribute("spaces.media.listeners", listeners)
    span.set_attribute("spaces.media.packets_sent", sent)
    span.set_attribute("spaces.media.bytes_sent", nbytes)
    span.end(end_time=now_ns)
