"""The shared runtime of every Spaces service.

One module per concept: ``settings`` (configuration), ``logs`` (JSON logging, redaction),
``context`` (per-call state), ``errors`` (ServiceError → google.rpc.Status), ``auth``
(tokens and principals), ``interceptors`` (server side of every call), ``clients``
(channels to other services), ``telemetry`` (tracing, /metrics), ``db`` (PostgreSQL pools),
``migrations`` (versioned SQL), ``redis`` (clients), ``outbox`` (transactional events to
Redis streams), ``events`` (consuming those streams) and ``server`` (bootstrap and
lifecycle). Nothing here knows about a particular service.
"""
