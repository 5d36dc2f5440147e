/* ICE consent STUN in C: see stun.h. */
#include "stun.h"

#include <string.h>

enum {
    HEADER_SIZE = 20,
    MAGIC_COOKIE = 0x2112A442,
    FINGERPRINT_XOR = 0x5354554E,
    ATTR_USERNAME = 0x0006,
    ATTR_MESSAGE_INTEGRITY = 0x0008,
    ATTR_USE_CANDIDATE = 0x0025,
    ATTR_FINGERPRINT = 0x8028,
    ATTR_ICE_CONTROLLED = 0x8029,
    ATTR_ICE_CONTROLLING = 0x802A,
    INTEGRITY_SIZE = 24, /* attribute header + 20-byte HMAC */
    FINGERPRINT_SIZE = 8
};

/* -- SHA-1 (FIPS 180-4) ------------------------------------------------------------ */

struct sha1 {
    uint32_t h[5];
    uint64_t length; /* bytes hashed */
    uint8_t block[64];
    int used;
};

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static uint32_t load_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void store_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void sha1_block(uint32_t h[5], const uint8_t *block)
{
    uint32_t w[80];
    for (int t = 0; t < 16; t++)
        w[t] = load_be32(block + 4 * t);
    for (int t = 16; t < 80; t++)
        w[t] = rol(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int t = 0; t < 80; t++) {
        uint32_t f, k;
        if (t < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (t < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (t < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t temp = rol(a, 5) + f + e + k + w[t];
        e = d;
        d = c;
        c = rol(b, 30);
        b = a;
        a = temp;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1_init(struct sha1 *s)
{
    static const uint32_t initial[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476,
                                        0xC3D2E1F0};
    memcpy(s->h, initial, sizeof initial);
    s->length = 0;
    s->used = 0;
}

static void sha1_update(struct sha1 *s, const uint8_t *data, int size)
{
    s->length += (uint64_t)size;
    while (size > 0) {
        int take = 64 - s->used < size ? 64 - s->used : size;
        memcpy(s->block + s->used, data, (size_t)take);
        s->used += take;
        data += take;
        size -= take;
        if (s->used == 64) {
            sha1_block(s->h, s->block);
            s->used = 0;
        }
    }
}

static void sha1_final(struct sha1 *s, uint8_t digest[20])
{
    uint64_t bits = s->length * 8;
    uint8_t pad = 0x80;
    sha1_update(s, &pad, 1);
    uint8_t zero = 0;
    while (s->used != 56)
        sha1_update(s, &zero, 1);
    uint8_t length[8];
    for (int i = 0; i < 8; i++)
        length[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(s, length, 8);
    for (int i = 0; i < 5; i++)
        store_be32(digest + 4 * i, s->h[i]);
}

/* HMAC over the concatenation of two parts (RFC 2104). */
static void hmac_sha1_2(const uint8_t *key, int key_size, const uint8_t *a, int a_size,
                        const uint8_t *b, int b_size, uint8_t mac[20])
{
    uint8_t block[64] = {0};
    if (key_size > 64) {
        struct sha1 k;
        sha1_init(&k);
        sha1_update(&k, key, key_size);
        sha1_final(&k, block);
    } else {
        memcpy(block, key, (size_t)key_size);
    }
    uint8_t pad[64];
    struct sha1 s;
    for (int i = 0; i < 64; i++)
        pad[i] = block[i] ^ 0x36;
    sha1_init(&s);
    sha1_update(&s, pad, 64);
    sha1_update(&s, a, a_size);
    sha1_update(&s, b, b_size);
    uint8_t inner[20];
    sha1_final(&s, inner);
    for (int i = 0; i < 64; i++)
        pad[i] = block[i] ^ 0x5c;
    sha1_init(&s);
    sha1_update(&s, pad, 64);
    sha1_update(&s, inner, 20);
    sha1_final(&s, mac);
}

void spaces_hmac_sha1(const uint8_t *key, int key_size, const uint8_t *data, int size,
                      uint8_t *mac)
{
    hmac_sha1_2(key, key_size, data, size, NULL, 0, mac);
}

/* -- CRC-32 (ISO-HDLC, as zlib) ------------------------------------------------------ */

static uint32_t crc_table[256];

__attribute__((constructor)) static void crc_table_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc32_update(uint32_t crc, const uint8_t *data, int size)
{
    crc = ~crc;
    for (int i = 0; i < size; i++)
        crc = crc_table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* -- messages ---------------------------------------------------------------------- */

static int load_be16(const uint8_t *p) { return p[0] << 8 | p[1]; }

/* The first `end` bytes of a message with its length field as if the message ended
 * `extra` bytes after `end` (what MESSAGE-INTEGRITY and FINGERPRINT cover): the patched
 * header, then the rest. */
static void patched_header(const uint8_t *data, int end, int extra, uint8_t header[4])
{
    int length = end - HEADER_SIZE + extra;
    header[0] = data[0];
    header[1] = data[1];
    header[2] = (uint8_t)(length >> 8);
    header[3] = (uint8_t)length;
}

static void integrity(const uint8_t *data, int end, const uint8_t *key, int key_size,
                      uint8_t mac[20])
{
    /* HMAC(header with patched length || data[4:end]), in two parts: no copy. */
    uint8_t header[4];
    patched_header(data, end, INTEGRITY_SIZE, header);
    uint8_t first[HEADER_SIZE];
    memcpy(first, header, 4);
    memcpy(first + 4, data + 4, HEADER_SIZE - 4);
    hmac_sha1_2(key, key_size, first, HEADER_SIZE, data + HEADER_SIZE, end - HEADER_SIZE,
                mac);
}

static uint32_t fingerprint(const uint8_t *data, int end)
{
    uint8_t header[4];
    patched_header(data, end, FINGERPRINT_SIZE, header);
    uint32_t crc = crc32_update(0, header, 4);
    crc = crc32_update(crc, data + 4, end - 4) ^ FINGERPRINT_XOR;
    return crc;
}

static int equal_in_constant_time(const uint8_t *a, const uint8_t *b, int size)
{
    uint8_t diff = 0;
    for (int i = 0; i < size; i++)
        diff |= a[i] ^ b[i];
    return diff == 0;
}

int spaces_stun_check(const uint8_t *data, int size, const uint8_t *key, int key_size,
                      struct spaces_stun_check *out)
{
    if (size < HEADER_SIZE)
        return 0;
    int length = load_be16(data + 2);
    if (load_be32(data + 4) != MAGIC_COOKIE || length != size - HEADER_SIZE || length % 4)
        return 0;
    out->type = load_be16(data);
    out->authenticated = 0;
    out->use_candidate = 0;
    out->role = 0;
    out->username_at = -1;
    out->username_size = 0;

    int integrity_at = -1; /* where MESSAGE-INTEGRITY is */
    int after = 0;         /* attributes after it */
    int fingerprint_at = -1, fingerprint_size = 0, last_type = 0;
    int at = HEADER_SIZE;
    while (at < size) {
        if (at + 4 > size)
            return 0; /* a truncated attribute header */
        int type = load_be16(data + at);
        int value_size = load_be16(data + at + 2);
        int end = at + 4 + value_size;
        if (end > size)
            return 0;
        if (type == ATTR_USERNAME && out->username_at < 0) {
            out->username_at = at + 4;
            out->username_size = value_size;
        }
        if (integrity_at == -2) {
            /* a MESSAGE-INTEGRITY of the wrong size came first: never authenticated */
        } else if (integrity_at == -1) {
            if (type == ATTR_MESSAGE_INTEGRITY) {
                integrity_at = value_size == 20 ? at : -2;
            } else {
                if (type == ATTR_USE_CANDIDATE)
                    out->use_candidate = 1;
                if ((type == ATTR_ICE_CONTROLLED || type == ATTR_ICE_CONTROLLING) && !out->role)
                    out->role = type;
            }
        } else {
            after++;
            last_type = type;
            fingerprint_at = at;
            fingerprint_size = value_size;
        }
        at = end + (-value_size & 3);
    }
    if (integrity_at < 0)
        return 1; /* none, or one of the wrong size: not authenticated */
    if (after > 1 || (after == 1 && last_type != ATTR_FINGERPRINT))
        return 1;
    uint8_t mac[20];
    integrity(data, integrity_at, key, key_size, mac);
    if (!equal_in_constant_time(mac, data + integrity_at + 4, 20))
        return 1;
    if (after == 1 &&
        (fingerprint_size != 4 ||
         fingerprint(data, fingerprint_at) != load_be32(data + fingerprint_at + 4)))
        return 1;
    out->authenticated = 1;
    return 1;
}

int spaces_stun_seal(uint8_t *out, int type, const uint8_t *tid, const uint8_t *body,
                     int body_size, const uint8_t *key, int key_size)
{
    out[0] = (uint8_t)(type >> 8);
    out[1] = (uint8_t)type;
    out[2] = (uint8_t)(body_size >> 8);
    out[3] = (uint8_t)body_size;
    store_be32(out + 4, MAGIC_COOKIE);
    memcpy(out + 8, tid, 12);
    memcpy(out + HEADER_SIZE, body, (size_t)body_size);
    int at = HEADER_SIZE + body_size;
    out[at] = ATTR_MESSAGE_INTEGRITY >> 8;
    out[at + 1] = ATTR_MESSAGE_INTEGRITY & 0xFF;
    out[at + 2] = 0;
    out[at + 3] = 20;
    integrity(out, at, key, key_size, out + at + 4);
    at += INTEGRITY_SIZE;
    out[at] = (uint8_t)(ATTR_FINGERPRINT >> 8);
    out[at + 1] = ATTR_FINGERPRINT & 0xFF;
    out[at + 2] = 0;
    out[at + 3] = 4;
    store_be32(out + at + 4, fingerprint(out, at));
    at += FINGERPRINT_SIZE;
    out[2] = (uint8_t)((at - HEADER_SIZE) >> 8);
    out[3] = (uint8_t)(at - HEADER_SIZE);
    return at;
}
