"""The web client: static files under ``client/`` (no build step), served by the gateway.

``/`` is ``client/index.html``; ``/web/<path>`` is ``client/<path>``. Serving is small and
closed by construction: a request path is accepted only when every segment is a plain
name (letters, digits, ``_``, ``-`` and inner dots; nothing hidden, no ``..``, no
backslash or NUL) with a known extension, and the resolved file (symlinks followed) must
still lie inside ``client/``. The content type comes from that extension, never from
sniffing. Files are small and are read per request, so an edited file is served at once;
``Cache-Control: no-cache`` with a strong ETag makes browsers revalidate (a 304 costs a
stat) rather than run a stale module graph, since nothing is fingerprinted.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import anyio
import grpc
from starlette.requests import Request
from starlette.responses import Response

from services.gateway.errors import GatewayError

__all__ = ["CLIENT_DIR", "INDEX_HEADERS", "StaticSite"]

CLIENT_DIR = Path(__file__).resolve().parent / "client"

CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}

_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
_MAX_PATH = 256

#: Headers of every static response.
COMMON_HEADERS: dict[str, str] = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}

#: Extra headers of the page itself: only our own scripts and styles run, the API and its
#: WebSockets are same-origin, audio plays from WebRTC streams, and the page cannot be
#: framed. The microphone is for this origin only.
INDEX_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; media-src 'self' blob: mediastream:; object-src 'none';"
        " base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
}


@dataclass(frozen=True)
class _File:
    path: Path
    content_type: str
    etag: str


class StaticSite:
    """Answers GET/HEAD for the client's files.

    :param root: the folder served (default: ``client/`` beside this module).
    """

    def __init__(self, root: Path = CLIENT_DIR) -> None:
        self._root = root.resolve()

    def find(self, relative: str) -> _File | None:
        """The file behind a request path relative to the root, or None if none is served."""
        if not relative or len(relative) > _MAX_PATH:
            return None
        segments = relative.split("/")
        if not all(_SEGMENT.fullmatch(segment) for segment in segments):
            return None
        content_type = CONTENT_TYPES.get(os.path.splitext(segments[-1])[1].lower())
        if content_type is None:
            return None
        path = self._root.joinpath(*segments).resolve()
        if not path.is_relative_to(self._root):
            return None  # a symlink pointing out of the client folder
        try:
            stat = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        tag = hashlib.blake2s(f"{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=8)
        return _File(path, content_type, f'"{tag.hexdigest()}"')

    async def respond(
        self, request: Request, relative: str, extra_headers: dict[str, str] | None = None
    ) -> Response:
        """The response to GET/HEAD of ``relative``: 200, 304 or a JSON 404."""
        found = self.find(relative)
        if found is None:
            return GatewayError(
                grpc.StatusCode.NOT_FOUND, "no such file", reason="FILE_NOT_FOUND"
            ).response()
        headers = {**COMMON_HEADERS, **(extra_headers or {}), "ETag": found.etag}
        if found.etag in _etags(request.headers.get("if-none-match", "")):
            return Response(status_code=304, headers=headers)
        try:
            body = await anyio.to_thread.run_sync(found.path.read_bytes)
        except OSError:
            return GatewayError(
                grpc.StatusCode.NOT_FOUND, "no such file", reason="FILE_NOT_FOUND"
            ).response()
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            return Response(status_code=200, headers=headers, media_type=found.content_type)
        return Response(body, headers=headers, media_type=found.content_type)


def _etags(header: str) -> set[str]:
    # If-None-Match: "a", W/"b" — a weak comparison is what 304s use (RFC 9110 13.1.2).
    tags = {part.strip().removeprefix("W/") for part in header.split(",")}
    return {tag for tag in tags if tag}
