/*
 * SRTP with AEAD_AES_128_GCM / AEAD_AES_256_GCM (RFC 7714) for the egress fast path:
 * protect only, one compact context per listener.
 *
 * Why not libsrtp: per packet it walks a chain of separately allocated objects (session,
 * stream list, stream, cipher, OpenSSL EVP context, provider context). In a fan-out to
 * a thousand listeners every one of them is cold, and libsrtp's protect costs about six
 * times its warm cost. Here a listener's whole sending state (round keys, hash key,
 * salt, per-SSRC rollover counters) is one block the fan-out loop prefetches.
 *
 * Needs AES-NI and PCLMULQDQ (spaces_srtp_gcm_available()); elsewhere the egress path
 * keeps libsrtp. Receiving (unprotect) stays with libsrtp.
 */
#ifndef SPACES_SRTP_GCM_H
#define SPACES_SRTP_GCM_H

#include <stddef.h>
#include <stdint.h>

enum {
    SPACES_SRTP_OK = 0,
    SPACES_SRTP_BAD_PACKET = 1, /* not an RTP packet, or its header overruns it */
    SPACES_SRTP_REPLAY = 2,     /* this index was protected already, or is too old */
    SPACES_SRTP_TOO_MANY_SSRCS = 3,
    SPACES_SRTP_BAD_KEY = 4,
    SPACES_SRTP_UNAVAILABLE = 5 /* the CPU lacks AES-NI or PCLMULQDQ */
};

/* The part of a context one packet touches (with up to three SSRCs). */
#define SPACES_SRTP_GCM_HOT_BYTES 384

/* Bytes to allocate for one context (aligned by the caller to 16 bytes). */
size_t spaces_srtp_gcm_size(void);
/* 1 when this CPU can run the code (AES-NI and PCLMULQDQ), else 0. */
int spaces_srtp_gcm_available(void);
/* Derive the session key and salt from the master key (16 or 32 bytes) and the 12-byte
 * master salt (RFC 3711 section 4.3, RFC 7714 section 11) into ctx. */
int spaces_srtp_gcm_init(void *ctx, const uint8_t *master_key, int key_len,
                         const uint8_t *master_salt, int salt_len);
/* Protect one RTP packet in place; *len grows by the 16-byte tag. The buffer must have
 * room for it. Same shape as libsrtp's srtp_protect, so the fan-out loop takes either. */
int spaces_srtp_gcm_protect(void *ctx, void *packet, int *len);
/* Raw AES-GCM with a 12-byte IV (for tests against other implementations): encrypts
 * text in place and writes the 16-byte tag. */
int spaces_aes_gcm_encrypt(const uint8_t *key, int key_len, const uint8_t *iv,
                           const uint8_t *aad, size_t aad_len, uint8_t *text,
                           size_t text_len, uint8_t *tag);

#endif
