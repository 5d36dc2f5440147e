"""Media: the WebRTC audio SFU of Spaces (aiortc for ICE/DTLS, forwarding without decode).

Modules, one concept each (the package imports none of them, so that the gateway can read
the node registry without loading aiortc):

* :mod:`~services.media.main` — the process: wiring, start-up, drain;
* :mod:`~services.media.api` — the gRPC servicer;
* :mod:`~services.media.node` — the node in the fleet: registry, placement, grants, drain;
* :mod:`~services.media.registry` — nodes, Spaces and permissions in Redis;
* :mod:`~services.media.placement` — the placement rules;
* :mod:`~services.media.clients` — reports to rooms, recordings' access checks;
* :mod:`~services.media.engine` — :class:`MediaEngine`, the API the gRPC layer calls;
* :mod:`~services.media.room` — a Space on this node: sessions, groups, speaker choice;
* :mod:`~services.media.session` — one participant's session and its permissions gate;
* :mod:`~services.media.peer` — the ``RTCPeerConnection`` of a session;
* :mod:`~services.media.sdp` — reading offers, Opus-only munging;
* :mod:`~services.media.icemux` — one UDP socket for all ICE sessions;
* :mod:`~services.media.ingress` — a publisher's RTP: parsing, levels, statistics;
* :mod:`~services.media.forwarding` — slot selection and the per-slot RTP rewrite;
* :mod:`~services.media.egress` — batched SRTP protect + ``sendmmsg`` on worker threads;
* :mod:`~services.media.srtp_fastpath` — libsrtp protection into shared buffers;
* :mod:`~services.media.rtcp` — sender/receiver reports and listener feedback;
* :mod:`~services.media.levels` — speaking levels (RFC 6464);
* :mod:`~services.media.rtp` — RTP header parsing and building;
* :mod:`~services.media.metrics` — Prometheus metrics;
* :mod:`~services.media.aiortc_internals` — every private aiortc/aioice attribute used.
"""
