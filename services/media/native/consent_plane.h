/*
 * The consent plane: a thread of its own that keeps ICE consent (RFC 7675) of connected
 * sessions off the Python event loop.
 *
 * The ICE mux's port carries, besides media, one STUN message per connected session
 * every couple of seconds in each direction: the peer's consent checks, which the node
 * answers, and the node's own checks and their answers. On the event loop each one was a
 * wake-up of its own on cold caches (~90 us of Python at a thousand listeners, a fifth of
 * an idle node's CPU). A classic BPF program on the port's SO_REUSEPORT group steers
 * every STUN datagram (first byte 0 or 1, RFC 7983) to a socket of its own, read by this
 * thread:
 *
 * - a binding request from an address the plane answers for (spaces_consent_answer_for),
 *   authenticated with that session's password, for its username fragment, without
 *   USE-CANDIDATE and without the role attribute that would be a conflict, is answered
 *   here (XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT);
 * - the node's own checks of tracked sessions (spaces_consent_track) are sent from here,
 *   each session every interval x 0.8-1.2; an answer must be authenticated with the
 *   session's remote password (an error answer counts as a refusal: 400/401 are not
 *   signed; a forged or corrupt one is dropped, as if lost). A check still unanswered when
 *   the next is due is a miss; `failures` misses in a row, or failures x 1.2 x interval
 *   without an answer, expire the session (RFC 7675: stop within 30 s). A paused session
 *   (nothing to check) keeps its consent: its clock stands still;
 * - anything else (connectivity checks, nominations, role conflicts, other addresses) is
 *   forwarded unchanged to forward_fd (a datagram socket the event loop reads), after a
 *   header of SPACES_CONSENT_HEADER bytes: family (4 or 6), 0, port (big endian),
 *   16 address bytes (an IPv4 address in the first 4).
 *
 * The thread tells the event loop about a tracked session through forward_fd too, with a
 * header whose family byte is 0: then byte 1 is the event (SPACES_CONSENT_MISS,
 * SPACES_CONSENT_RECOVERED, SPACES_CONSENT_EXPIRED) and bytes 4-11 the session's id
 * (little endian). An expired session is untracked by the thread itself.
 */
#ifndef SPACES_CONSENT_PLANE_H
#define SPACES_CONSENT_PLANE_H

#include <stdint.h>

#define SPACES_CONSENT_HEADER 20
#define SPACES_CONSENT_MISS 1
#define SPACES_CONSENT_RECOVERED 2
#define SPACES_CONSENT_EXPIRED 3

/* Counters of what the thread did. */
struct spaces_consent_stats {
    uint64_t answered;  /* peers' checks answered */
    uint64_t checked;   /* checks of the node's sent */
    uint64_t verified;  /* answers to those taken */
    uint64_t missed;    /* checks left unanswered */
    uint64_t expired;   /* sessions whose consent ran out */
    uint64_t forwarded; /* datagrams handed to the event loop */
    uint64_t dropped;   /* forged answers, forwards that did not fit, failed sends */
};

/* A plane reading stun_fd and forwarding to forward_fd, checking tracked sessions every
 * interval seconds (mean) and expiring them after `failures` misses; NULL when out of
 * memory or the thread cannot start. Both descriptors stay the caller's (closed after
 * free). */
void *spaces_consent_new(int stun_fd, int forward_fd, double interval, int failures);

/* Stop the thread, wait for it and free the plane. */
void spaces_consent_free(void *plane);

/* Answer consent checks from (family, address, port) for the session with this local
 * username fragment and password; conflict is the role attribute it must not carry
 * (0x8029 or 0x802A; 0 for none). Replaces what was set for the address. 0 on success,
 * -1 when an argument is too long or out of memory. */
int spaces_consent_answer_for(void *plane, int family, const uint8_t *address, int port,
                              const char *ufrag, int ufrag_size, const uint8_t *password,
                              int password_size, int conflict);

/* Stop answering for the address (its checks go to forward_fd again). */
void spaces_consent_forget(void *plane, int family, const uint8_t *address, int port);

/* Check session `id` at (family, address, port) with binding requests carrying the
 * attributes `body` (USERNAME, PRIORITY, the role; a multiple of 4 bytes), signed with
 * key (the remote password). A new session's first check is one interval away; for a
 * tracked one, the new parameters apply from its next check on and it is no longer
 * paused. 0 on success, -1 when an argument is too long or out of memory. */
int spaces_consent_track(void *plane, uint64_t id, int family, const uint8_t *address,
                         int port, const uint8_t *body, int body_size, const uint8_t *key,
                         int key_size);

/* Nothing to check for session `id` for now: its consent clock stands still until it is
 * tracked again. */
void spaces_consent_pause(void *plane, uint64_t id);

/* Stop checking session `id`. */
void spaces_consent_untrack(void *plane, uint64_t id);

/* How many sessions are tracked. */
int spaces_consent_tracked(void *plane);

void spaces_consent_stats(void *plane, struct spaces_consent_stats *out);

#endif
