"""Builds :mod:`_spaces_media_fanout`, the C inner loop of the egress fast path.

Run by ``make`` (``python -m services.media.native.build [output_dir]``); the module
lands in ``build/gen`` beside the generated protos, which is on the import path. It
needs a C compiler at build time only and links nothing but libc: libsrtp's
``srtp_protect`` is passed in at run time as pylibsrtp's own function pointer, and the
module's own SRTP AES-GCM protect (``srtp_gcm.c``, AES-NI) is another such pointer. When the
module is missing, :mod:`services.media.egress` runs the same loop in Python.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import cffi  # type: ignore[import-untyped]

MODULE = "_spaces_media_fanout"
SOURCE = Path(__file__).with_name("fanout.c")
SOURCES = [Path(__file__).with_name("srtp_gcm.c")]

CDEF = """
int spaces_fanout(uintptr_t protect_address, int fd, uintptr_t sessions_address,
                  uintptr_t buffers_address, size_t stride, uintptr_t lengths_address,
                  uintptr_t msgs_address, int count, int chunk, const char *packet, int size,
                  double *chunk_done, int *chunk_sent, long *totals);
size_t spaces_srtp_gcm_size(void);
int spaces_srtp_gcm_available(void);
int spaces_srtp_gcm_init(void *ctx, const uint8_t *master_key, int key_len,
                         const uint8_t *master_salt, int salt_len);
int spaces_srtp_gcm_protect(void *ctx, void *packet, int *len);
int spaces_aes_gcm_encrypt(const uint8_t *key, int key_len, const uint8_t *iv,
                           const uint8_t *aad, size_t aad_len, uint8_t *text,
                           size_t text_len, uint8_t *tag);
"""


def builder() -> cffi.FFI:
    """The cffi builder of the module (API mode, compiled from ``fanout.c``)."""
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        MODULE,
        '#include "srtp_gcm.h"\n' + SOURCE.read_text(),
        sources=[str(path) for path in SOURCES],
        include_dirs=[str(SOURCE.parent)],
        extra_compile_args=["-O2", "-std=gnu11"],
    )
    return ffi


def build(output_dir: Path) -> Path:
    """Compile the module into ``output_dir``; returns the library's path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spaces-native-") as work:
        library = Path(builder().compile(tmpdir=work, verbose=False))
        target = output_dir / library.name
        shutil.copyfile(library, target)
    return target


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/gen")
    print(f"built {build(out)}")
