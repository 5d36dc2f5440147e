/*
 * The STUN messages of ICE consent (RFC 7675) that a connected session exchanges, checked
 * and built in C: a peer's binding request and its success response, the node's own
 * checks and their answers. MESSAGE-INTEGRITY is HMAC-SHA1 (RFC 8489 section 14.5),
 * FINGERPRINT a CRC-32 (section 14.7), both computed here.
 *
 * Why C: a media node answers and sends one consent message per connected session every
 * couple of seconds, each on its own event-loop wake-up. In Python (with OpenSSL's HMAC)
 * each one cost ~100 us on a cold cache, a third of an idle node's CPU at a thousand
 * listeners. The Python code in services/media/consent.py stays as the reference and
 * the fallback, and the tests hold both to the same bytes.
 */
#ifndef SPACES_STUN_H
#define SPACES_STUN_H

#include <stdint.h>

/* What spaces_stun_check found in a well-formed STUN message. */
struct spaces_stun_check {
    int type;          /* the message type (method and class) */
    int authenticated; /* MESSAGE-INTEGRITY matched the key, and only a valid
                          FINGERPRINT follows it */
    int use_candidate; /* USE-CANDIDATE comes before MESSAGE-INTEGRITY */
    int role;          /* the first ICE-CONTROLLED / ICE-CONTROLLING type before
                          MESSAGE-INTEGRITY, else 0 */
    int username_at;   /* offset of the first USERNAME's value, -1 without one */
    int username_size;
};

/* 1 and *out filled when data is a well-formed STUN message (header, magic cookie,
 * length, attribute layout), else 0. key is the MESSAGE-INTEGRITY key. */
int spaces_stun_check(const uint8_t *data, int size, const uint8_t *key, int key_size,
                      struct spaces_stun_check *out);

/* Write a STUN message of `type` with transaction id `tid` (12 bytes), the attributes
 * `body` (a multiple of 4 bytes), then MESSAGE-INTEGRITY with `key` and FINGERPRINT, into
 * `out`, which holds at least 20 + body_size + 32 bytes. Returns the length written. */
int spaces_stun_seal(uint8_t *out, int type, const uint8_t *tid, const uint8_t *body,
                     int body_size, const uint8_t *key, int key_size);

/* HMAC-SHA1 of data (20 bytes into mac); exposed for the tests. */
void spaces_hmac_sha1(const uint8_t *key, int key_size, const uint8_t *data, int size,
                      uint8_t *mac);

#endif
