"""The HTTP/JSON + WebSocket gateway: routes derived from ``google.api.http`` rules."""
