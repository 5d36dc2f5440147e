"""Direct libsrtp protection into preallocated buffers, for the egress batches.

``pylibsrtp.Session.protect`` copies the packet into the session's own buffer, checks it,
calls libsrtp, and returns a new ``bytes`` (about 3 µs here). The egress path instead
keeps one buffer slot per listener, copies the shared plaintext into all of them at once
(numpy), and calls ``srtp_protect`` of the same compiled libsrtp binding on each slot in
place; ``map`` over the bound C function keeps the per-listener work free of Python
bytecode. This needs two private pieces of pylibsrtp 1.0 (pinned, and covered by
``tests/unit/media/test_aiortc_internals.py``): the cffi module ``pylibsrtp._binding``
and a session's ``_srtp`` (a ``srtp_t *``).

cffi releases the GIL around every call. That is cheapest on the event loop thread, but
an egress *thread* would then have to win the GIL back after every listener, and waits
up to the interpreter's switch interval whenever the event loop runs Python meanwhile (a
convoy that starves the worker). :data:`srtp_protect_holding_gil` calls the same C
function through ctypes' ``PYFUNCTYPE``, which keeps the GIL: a worker then gives the
GIL up once per ``sendmmsg`` only.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np
import numpy.typing as npt
import pylibsrtp
from pylibsrtp import _binding

logger = logging.getLogger(__name__)

__all__ = [
    "SRTP_MAX_TRAILER",
    "SRTP_OK",
    "SRTP_PROTECT_ADDRESS",
    "ProtectBuffers",
    "srtp_protect",
    "srtp_protect_holding_gil",
    "srtp_session_address",
    "srtp_session_pointer",
]

SRTP_MAX_TRAILER = pylibsrtp.SRTP_MAX_TRAILER_LEN
"""Room libsrtp may append to a packet (tag and MKI)."""
SRTP_OK: int = _binding.lib.srtp_err_status_ok
srtp_protect: Any = _binding.lib.srtp_protect
"""``srtp_err_status_t srtp_protect(srtp_t ctx, void *rtp_hdr, int *len_ptr)`` (libsrtp 2)."""

_FFI: Any = _binding.ffi

SRTP_PROTECT_ADDRESS: int = int(
    _FFI.cast("uintptr_t", _FFI.addressof(_binding.lib, "srtp_protect"))
)
"""The address of ``srtp_protect`` (for the native egress loop)."""

srtp_protect_holding_gil: Any = ctypes.PYFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
)(SRTP_PROTECT_ADDRESS)
"""``srtp_protect`` called without releasing the GIL; takes addresses as ints."""


def srtp_session_pointer(session: pylibsrtp.Session) -> Any:
    """The ``srtp_t`` of a pylibsrtp session (valid while ``session`` is alive)."""
    return session._srtp[0]


def srtp_session_address(session: pylibsrtp.Session) -> int:
    """The ``srtp_t`` of a pylibsrtp session as an address (for ctypes)."""
    return int(_FFI.cast("uintptr_t", srtp_session_pointer(session)))


class ProtectBuffers:
    """``capacity`` packet buffers of ``stride`` bytes and their lengths, for libsrtp.

    :ivar rows: numpy view, one row per buffer (to copy a plaintext into many at once).
    :ivar lengths: numpy view of the ``int`` lengths libsrtp reads and updates.
    :ivar pointers: ``char *`` to each buffer, for ``srtp_protect``.
    :ivar length_pointers: ``int *`` to each length, for ``srtp_protect``.
    :ivar addresses: the buffers' addresses as ints (for ctypes).
    :ivar length_addresses: the lengths' addresses as ints (for ctypes).
    """

    def __init__(self, capacity: int, stride: int) -> None:
        self.capacity = capacity
        self.stride = stride
        self._data = _FFI.new("char[]", capacity * stride)
        self._lengths = _FFI.new("int[]", capacity)
        self.rows: npt.NDArray[np.uint8] = np.frombuffer(
            _FFI.buffer(self._data), dtype=np.uint8
        ).reshape(capacity, stride)
        self.lengths: npt.NDArray[np.int32] = np.frombuffer(
            _FFI.buffer(self._lengths), dtype=np.int32
        )
        self.pointers: list[Any] = [self._data + i * stride for i in range(capacity)]
        self.length_pointers: list[Any] = [self._lengths + i for i in range(capacity)]
        base = int(_FFI.cast("uintptr_t", self._data))
        lengths = int(_FFI.cast("uintptr_t", self._lengths))
        self.addresses = [base + i * stride for i in range(capacity)]
        self.length_addresses = [lengths + 4 * i for i in range(capacity)]

    def address(self, index: int) -> int:
        """The memory address of buffer ``index`` (for an ``iovec``)."""
        return self.addresses[index]

    def packet(self, index: int) -> bytes:
        """A copy of buffer ``index`` as protected (for tests and the slow path)."""
        return bytes(_FFI.buffer(self.pointers[index], int(self.lengths[index])))
