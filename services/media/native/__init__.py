"""The media fast path's C code, built by ``make`` (``build.py``) into ``build/gen`` as
the cffi module ``_spaces_media_fanout``: the fan-out loop, SRTP AES-GCM protect and
ICE consent STUN.

:data:`MODULE` is that module, or ``None`` when it was not built (no C compiler); the
egress path then runs its Python loop with libsrtp, and consent its Python STUN code.
"""

from __future__ import annotations

from typing import Any

try:
    import _spaces_media_fanout  # type: ignore[import-not-found]

    MODULE: Any = _spaces_media_fanout
except ImportError:  # pragma: no cover - depends on the build
    MODULE = None

__all__ = ["MODULE"]
