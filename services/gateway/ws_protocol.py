"""The gateway's WebSocket protocol for uvicorn: its ``websockets-sansio`` one, answering
handshake requests it cannot parse.

When a WebSocket upgrade request is too large or malformed (a request line past 8 KiB,
say, from a long ``resume_token``), ``websockets`` refuses it and queues the answer (414,
431 or 400), but uvicorn 0.54's sans-I/O protocol never writes that answer or closes the
socket: the client hangs until its own timeout and the server keeps the connection. This
subclass sends what ``websockets`` queued and closes.
``tests/integration/gateway/test_websocket_hostile.py`` pins the behaviour.
"""

from __future__ import annotations

import logging

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

logger = logging.getLogger(__name__)

__all__ = ["HandshakeCheckedWebSocketProtocol"]


class HandshakeCheckedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol that answers an unparsable handshake."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.handshake_exc is not None and not self.transport.is_closing():
            logger.info("refused a WebSocket handshake: %s", self.conn.handshake_exc)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
