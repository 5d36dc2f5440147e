"""Builds :mod:`_spaces_media_fanout`, the C inner loop of the egress fast path.

Run by ``make`` (``python -m services.media.native.build [output_dir]``); the module
lands in ``build/gen`` beside the generated protos, which is on the import path. It
needs a C compiler at build time only and links nothing but libc (and pthreads): libsrtp's
``srtp_protect`` is passed in at run time as pylibsrtp's own function pointer, and the
module's own SRTP AES-GCM protect (``srtp_gcm.c``, AES-NI) is another such pointer. It also
checks and builds ICE consent STUN (``stun.c``), and runs the consent plane's thread
(``consent_plane.c``). When the module is missing,
:mod:`services.media.egress` and :mod:`services.media.consent` run in Python.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import cffi  # type: ignore[import-untyped]

MODULE = "_spaces_media_fanout"
SOURCE = Path(__file__).with_name("fanout.c")
SOURCES = [Path(__file__).with_name(name) for name in ("srtp_gcm.c", "stun.c", "consent_plane.c")]

HEADERS = [SOURCE.with_name(name) for name in ("srtp_gcm.h", "stun.h", "consent_plane.h")]
FANOUT_CDEF = """
void *spaces_fanout_pool_new(int helpers);
int spaces_fanout_pool_size(void *pool_address);
int spaces_fanout_pool_parts(void *pool_address);
void spaces_fanout_pool_set_fd(void *pool_address, int index, int fd);
void spaces_fanout_pool_free(void *pool_address);
int spaces_fanout(void *pool_address, uintptr_t protect_address, int fd,
                  uintptr_t sessions_address, uintptr_t buffers_address, size_t stride,
                  uintptr_t lengths_address, uintptr_t msgs_address, int count, int chunk,
                  const char *packet, int size, double *chunk_done, int *chunk_sent,
                  long *totals);
"""


def header_declarations(header: Path) -> str:
    """A header's declarations as cffi reads them: every preprocessor line dropped but
    constant ``#define NAME value`` lines (the include guard and includes go)."""
    return "\n".join(
        line
        for line in header.read_text().splitlines()
        if not line.startswith("#") or (line.startswith("#define ") and len(line.split()) == 3)
    )


def builder() -> cffi.FFI:
    """The cffi builder of the module (API mode, compiled from ``fanout.c``)."""
    ffi = cffi.FFI()
    ffi.cdef("\n".join([FANOUT_CDEF, *(header_declarations(header) for header in HEADERS)]))
    ffi.set_source(
        MODULE,
        "".join(f'#include "{header.name}"\n' for header in HEADERS) + SOURCE.read_text(),
        sources=[str(path) for path in SOURCES],
        include_dirs=[str(SOURCE.parent)],
        extra_compile_args=["-O2", "-std=gnu11", "-pthread"],
        extra_link_args=["-pthread"],
    )
    return ffi


def build(output_dir: Path) -> Path:
    """Compile the module into ``output_dir``; returns the library's path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spaces-native-") as work:
        library = Path(builder().compile(tmpdir=work, verbose=False))
        target = output_dir / library.name
        # A new file renamed over the old one: a process that has the old module mapped
        # (this one, through the package's import, or a running node) keeps its copy;
        # writing into that file in place would crash it.
        staging = output_dir / f".{library.name}.new"
        shutil.copyfile(library, staging)
        os.replace(staging, target)
    return target


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/gen")
    print(f"built {build(out)}")
