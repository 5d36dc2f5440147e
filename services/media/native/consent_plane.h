/*
 * The consent plane: a thread of its own that keeps ICE consent (RFC 7675) of connected
 * sessions off the Python event loop.
 *
 * The ICE mux's port carries, besides media, one STUN message per connected session
 * every couple of seconds in each direction: the peer's consent checks, which the node
 * answers, and the answers to the node's own checks. On the event loop each one is a
 * wake-up of its own on cold caches (~90 us of Python at a thousand listeners, a fifth of
 * an idle node's CPU). A classic BPF program on the port's SO_REUSEPORT group steers
 * every STUN datagram (first byte 0 or 1, RFC 7983) to a socket of its own, read by this
 * thread:
 *
 * - a binding request from an address the plane answers for (spaces_consent_answer_for),
 *   authenticated with that session's password, for its username fragment, without
 *   USE-CANDIDATE and without the role attribute that would be a conflict, is answered
 *   here (XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT);
 * - a binding response whose transaction the plane expects (spaces_consent_expect) is
 *   checked with that check's key and queued for spaces_consent_take: a success must be
 *   authenticated, an error counts as a refusal (400/401 are not signed); a forged or
 *   corrupt one is dropped, as if lost;
 * - anything else (connectivity checks, nominations, role conflicts, other addresses) is
 *   forwarded unchanged to forward_fd (a datagram socket the event loop reads), after a
 *   header of SPACES_CONSENT_HEADER bytes: family (4 or 6), 0, port (big endian),
 *   16 address bytes (an IPv4 address in the first 4).
 */
#ifndef SPACES_CONSENT_PLANE_H
#define SPACES_CONSENT_PLANE_H

#include <stdint.h>

#define SPACES_CONSENT_HEADER 20

/* An answer to one of the node's checks. when: CLOCK_MONOTONIC seconds (Python's
 * time.monotonic()). */
struct spaces_consent_answer {
    uint8_t tid[12];
    int success;
    double when;
};

/* Counters of what the thread did with the datagrams it read. */
struct spaces_consent_stats {
    uint64_t answered;  /* peers' checks answered */
    uint64_t verified;  /* answers to the node's checks taken */
    uint64_t forwarded; /* handed to the event loop */
    uint64_t dropped;   /* forged answers, forwards that did not fit, failed sends */
};

/* A plane reading stun_fd and forwarding to forward_fd; NULL when out of memory or the
 * thread cannot start. Both descriptors stay the caller's (closed after free). */
void *spaces_consent_new(int stun_fd, int forward_fd);

/* Stop the thread, wait for it and free the plane. */
void spaces_consent_free(void *plane);

/* Answer consent checks from (family, address, port) for the session with this local
 * username fragment and password; conflict is the role attribute it must not carry
 * (0x8029 or 0x802A; 0 for none). Replaces what was set for the address. 0 on success, -1 when an
 * argument is too long or out of memory. */
int spaces_consent_answer_for(void *plane, int family, const uint8_t *address, int port,
                              const char *ufrag, int ufrag_size, const uint8_t *password,
                              int password_size, int conflict);

/* Stop answering for the address (its checks go to forward_fd again). */
void spaces_consent_forget(void *plane, int family, const uint8_t *address, int port);

/* Take the answer to the check with transaction id tid (12 bytes), signed with key. */
int spaces_consent_expect(void *plane, const uint8_t *tid, const uint8_t *key, int key_size);

/* Stop expecting an answer for tid. */
void spaces_consent_unexpect(void *plane, const uint8_t *tid);

/* Move up to max answers taken since the last call into out; returns how many. */
int spaces_consent_take(void *plane, struct spaces_consent_answer *out, int max);

void spaces_consent_stats(void *plane, struct spaces_consent_stats *out);

#endif
