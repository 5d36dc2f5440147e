/*
 * SRTP AES-GCM protect (RFC 7714) on AES-NI and PCLMULQDQ; see srtp_gcm.h for why.
 *
 * GHASH works on blocks loaded big-endian into 128-bit integers, where bit 127 - i holds
 * the coefficient of x^i (GCM's bit order, reflected). A carry-less product of two such
 * values, shifted left by one, holds the reflected low half of the 255-degree product in
 * its upper 128 bits and the reflected high half in its lower 128 bits; the high half is
 * then folded twice by x^128 = x^7 + x^2 + x + 1 (NIST SP 800-38D's polynomial), which in
 * the reflected form is a right shift for every term (and a left shift by 128 - j for
 * the bits that pass x^128 again).
 *
 * Every function is correct for any input; the tests compare it byte for byte with
 * OpenSSL's AES-GCM (through `cryptography`) and with libsrtp's srtp_protect.
 */
#include "srtp_gcm.h"

#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define SPACES_HAVE_GCM 1
#include <immintrin.h>
#define TARGET __attribute__((target("aes,pclmul,sse4.1")))
#else
#define SPACES_HAVE_GCM 0
#endif

enum { MAX_SSRCS = 16, REPLAY_WINDOW = 64 };

/* What the sender remembers of one SSRC: its rollover counter, highest sequence number
 * and which of the 64 indices below the highest were protected already. */
struct ssrc_state {
    uint32_t ssrc;
    uint32_t roc;
    uint64_t window;
    uint16_t highest_seq;
};

/* Laid out in the order a packet touches it: the fan-out loop prefetches the first
 * SPACES_SRTP_GCM_HOT_BYTES (round keys, hash key, salt, the first SSRCs). */
struct spaces_srtp_gcm {
    uint8_t round_keys[15][16];
    uint64_t hash_key[2]; /* H = AES(0), reflected: [0] low 64 bits, [1] high */
    uint8_t salt[12];
    int rounds;
    int ssrc_count;
    struct ssrc_state ssrcs[MAX_SSRCS];
};

size_t spaces_srtp_gcm_size(void) { return sizeof(struct spaces_srtp_gcm); }

static inline uint32_t load_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t load_be64(const uint8_t *p)
{
    return ((uint64_t)load_be32(p) << 32) | load_be32(p + 4);
}

static inline void store_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

/* Which rollover counter the sender uses for seq (RFC 3711 section 3.3.1 and appendix
 * A), and whether that index may be protected: never twice, never 64 or more below the
 * highest. Updates the state only when it may. */
static int next_index(struct ssrc_state *s, uint16_t seq, uint32_t *roc_out)
{
    int64_t v = s->roc;
    if (s->highest_seq < 32768) {
        if ((int)seq - (int)s->highest_seq > 32768)
            v -= 1;
    } else if ((int)s->highest_seq - 32768 > (int)seq) {
        v += 1;
    }
    if (v < 0)
        return SPACES_SRTP_REPLAY;
    int64_t highest = ((int64_t)s->roc << 16) | s->highest_seq;
    int64_t index = (v << 16) | seq;
    if (index > highest) {
        int64_t delta = index - highest;
        s->window = delta >= REPLAY_WINDOW ? 1 : (s->window << delta) | 1;
        s->roc = (uint32_t)v;
        s->highest_seq = seq;
    } else {
        int64_t delta = highest - index;
        if (delta >= REPLAY_WINDOW || (s->window >> delta) & 1)
            return SPACES_SRTP_REPLAY;
        s->window |= (uint64_t)1 << delta;
    }
    *roc_out = (uint32_t)v;
    return SPACES_SRTP_OK;
}

static struct ssrc_state *ssrc_state(struct spaces_srtp_gcm *ctx, uint32_t ssrc, uint16_t seq,
                                     int *created)
{
    for (int i = 0; i < ctx->ssrc_count; i++)
        if (ctx->ssrcs[i].ssrc == ssrc)
            return &ctx->ssrcs[i];
    if (ctx->ssrc_count == MAX_SSRCS)
        return NULL;
    /* The first packet of an SSRC has rollover counter 0 (nothing was signalled). */
    struct ssrc_state *s = &ctx->ssrcs[ctx->ssrc_count];
    s->ssrc = ssrc;
    s->roc = 0;
    s->highest_seq = seq;
    s->window = 0;
    *created = 1;
    return s;
}

#if SPACES_HAVE_GCM

int spaces_srtp_gcm_available(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("aes") && __builtin_cpu_supports("pclmul") &&
           __builtin_cpu_supports("sse4.1");
}

TARGET static __m128i expand_step(__m128i key, __m128i assist)
{
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, assist);
}

/* FIPS-197 key expansion; the round constants must be literals for aeskeygenassist. */
#define EXPAND128(i, rcon)                                                                 \
    rk[i] = expand_step(rk[i - 1],                                                         \
                        _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[i - 1], rcon), 0xff))
#define EXPAND256(i, rcon)                                                                 \
    rk[i] = expand_step(rk[i - 2],                                                         \
                        _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[i - 1], rcon), 0xff))
#define EXPAND256_ODD(i)                                                                   \
    rk[i] = expand_step(rk[i - 2],                                                         \
                        _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[i - 1], 0), 0xaa))

TARGET static int expand_key(const uint8_t *key, int key_len, uint8_t out[15][16], int *rounds)
{
    __m128i rk[15];
    if (key_len == 16) {
        rk[0] = _mm_loadu_si128((const __m128i *)key);
        EXPAND128(1, 0x01);
        EXPAND128(2, 0x02);
        EXPAND128(3, 0x04);
        EXPAND128(4, 0x08);
        EXPAND128(5, 0x10);
        EXPAND128(6, 0x20);
        EXPAND128(7, 0x40);
        EXPAND128(8, 0x80);
        EXPAND128(9, 0x1b);
        EXPAND128(10, 0x36);
        *rounds = 10;
    } else if (key_len == 32) {
        rk[0] = _mm_loadu_si128((const __m128i *)key);
        rk[1] = _mm_loadu_si128((const __m128i *)(key + 16));
        EXPAND256(2, 0x01);
        EXPAND256_ODD(3);
        EXPAND256(4, 0x02);
        EXPAND256_ODD(5);
        EXPAND256(6, 0x04);
        EXPAND256_ODD(7);
        EXPAND256(8, 0x08);
        EXPAND256_ODD(9);
        EXPAND256(10, 0x10);
        EXPAND256_ODD(11);
        EXPAND256(12, 0x20);
        EXPAND256_ODD(13);
        EXPAND256(14, 0x40);
        *rounds = 14;
    } else {
        return SPACES_SRTP_BAD_KEY;
    }
    for (int i = 0; i <= *rounds; i++)
        _mm_storeu_si128((__m128i *)out[i], rk[i]);
    return SPACES_SRTP_OK;
}

TARGET static inline __m128i aes_block(const uint8_t rk[15][16], int rounds, __m128i block)
{
    block = _mm_xor_si128(block, _mm_loadu_si128((const __m128i *)rk[0]));
    for (int r = 1; r < rounds; r++)
        block = _mm_aesenc_si128(block, _mm_loadu_si128((const __m128i *)rk[r]));
    return _mm_aesenclast_si128(block, _mm_loadu_si128((const __m128i *)rk[rounds]));
}

typedef unsigned __int128 u128;

static inline u128 load_be128(const uint8_t *p)
{
    return ((u128)load_be64(p) << 64) | load_be64(p + 8);
}

/* a * b in GF(2^128), both reflected (see the top of the file). */
TARGET static inline u128 gf_mul(u128 a, const uint64_t b[2])
{
    __m128i x = _mm_set_epi64x((long long)(uint64_t)(a >> 64), (long long)(uint64_t)a);
    __m128i y = _mm_set_epi64x((long long)b[1], (long long)b[0]);
    __m128i lo = _mm_clmulepi64_si128(x, y, 0x00);
    __m128i hi = _mm_clmulepi64_si128(x, y, 0x11);
    __m128i mid = _mm_xor_si128(_mm_clmulepi64_si128(x, y, 0x10),
                                _mm_clmulepi64_si128(x, y, 0x01));
    u128 p_lo = ((u128)(uint64_t)_mm_extract_epi64(lo, 1) << 64) |
                (uint64_t)_mm_cvtsi128_si64(lo);
    u128 p_hi = ((u128)(uint64_t)_mm_extract_epi64(hi, 1) << 64) |
                (uint64_t)_mm_cvtsi128_si64(hi);
    u128 p_mid = ((u128)(uint64_t)_mm_extract_epi64(mid, 1) << 64) |
                 (uint64_t)_mm_cvtsi128_si64(mid);
    /* The 256-bit product, then shifted left by one. */
    u128 t_hi = p_hi ^ (p_mid >> 64);
    u128 t_lo = p_lo ^ (p_mid << 64);
    u128 low_half = (t_hi << 1) | (t_lo >> 127);  /* reflected L */
    u128 high_half = t_lo << 1;                    /* reflected H (degrees 128..254) */
    u128 over = (high_half << 127) ^ (high_half << 126) ^ (high_half << 121);
    return low_half ^ high_half ^ (high_half >> 1) ^ (high_half >> 2) ^ (high_half >> 7) ^
           over ^ (over >> 1) ^ (over >> 2) ^ (over >> 7);
}

/* Absorb len bytes (zero-padded to whole blocks) into the running hash. */
TARGET static inline u128 ghash(u128 state, const uint64_t key[2], const uint8_t *data,
                                size_t len)
{
    while (len >= 16) {
        state = gf_mul(state ^ load_be128(data), key);
        data += 16;
        len -= 16;
    }
    if (len) {
        uint8_t last[16] = {0};
        memcpy(last, data, len);
        state = gf_mul(state ^ load_be128(last), key);
    }
    return state;
}

TARGET static void gcm_encrypt(const uint8_t rk[15][16], int rounds, const uint64_t hash_key[2],
                               const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
                               uint8_t *text, size_t text_len, uint8_t tag[16])
{
    uint8_t counter[16];
    memcpy(counter, iv, 12);
    counter[12] = counter[13] = counter[14] = 0;
    counter[15] = 1;
    __m128i tag_mask = aes_block(rk, rounds, _mm_loadu_si128((const __m128i *)counter));
    uint32_t block = 1;
    for (size_t offset = 0; offset < text_len; offset += 16) {
        block++;
        counter[12] = (uint8_t)(block >> 24);
        counter[13] = (uint8_t)(block >> 16);
        counter[14] = (uint8_t)(block >> 8);
        counter[15] = (uint8_t)block;
        __m128i stream = aes_block(rk, rounds, _mm_loadu_si128((const __m128i *)counter));
        size_t n = text_len - offset < 16 ? text_len - offset : 16;
        if (n == 16) {
            __m128i plain = _mm_loadu_si128((const __m128i *)(text + offset));
            _mm_storeu_si128((__m128i *)(text + offset), _mm_xor_si128(plain, stream));
        } else {
            uint8_t pad[16];
            _mm_storeu_si128((__m128i *)pad, stream);
            for (size_t i = 0; i < n; i++)
                text[offset + i] ^= pad[i];
        }
    }
    u128 state = ghash(0, hash_key, aad, aad_len);
    state = ghash(state, hash_key, text, text_len);
    uint8_t lengths[16];
    store_be64(lengths, (uint64_t)aad_len * 8);
    store_be64(lengths + 8, (uint64_t)text_len * 8);
    state = gf_mul(state ^ load_be128(lengths), hash_key);
    uint8_t digest[16];
    store_be64(digest, (uint64_t)(state >> 64));
    store_be64(digest + 8, (uint64_t)state);
    _mm_storeu_si128((__m128i *)tag, _mm_xor_si128(_mm_loadu_si128((const __m128i *)digest),
                                                   tag_mask));
}

TARGET static void hash_key_of(const uint8_t rk[15][16], int rounds, uint64_t out[2])
{
    uint8_t h[16];
    _mm_storeu_si128((__m128i *)h, aes_block(rk, rounds, _mm_setzero_si128()));
    out[1] = load_be64(h);
    out[0] = load_be64(h + 8);
}

/* The SRTP key derivation function with AES in counter mode as the PRF (RFC 3711
 * section 4.3.3), key derivation rate 0: block j of the key stream for label is
 * AES(master key, (master salt || 0 0) XOR (label << 64) + j). */
TARGET static int derive(const uint8_t *master_key, int key_len, const uint8_t *master_salt,
                         int salt_len, uint8_t label, uint8_t *out, int out_len)
{
    uint8_t rk[15][16];
    int rounds;
    int status = expand_key(master_key, key_len, rk, &rounds);
    if (status != SPACES_SRTP_OK)
        return status;
    uint8_t counter[16] = {0};
    memcpy(counter, master_salt, (size_t)salt_len);
    counter[7] ^= label;
    for (int j = 0; j * 16 < out_len; j++) {
        counter[14] = (uint8_t)(j >> 8);
        counter[15] = (uint8_t)j;
        uint8_t stream[16];
        _mm_storeu_si128((__m128i *)stream,
                         aes_block(rk, rounds, _mm_loadu_si128((const __m128i *)counter)));
        int n = out_len - j * 16 < 16 ? out_len - j * 16 : 16;
        memcpy(out + j * 16, stream, (size_t)n);
    }
    memset(rk, 0, sizeof rk);
    return SPACES_SRTP_OK;
}

int spaces_srtp_gcm_init(void *ctx_address, const uint8_t *master_key, int key_len,
                         const uint8_t *master_salt, int salt_len)
{
    struct spaces_srtp_gcm *ctx = ctx_address;
    if (!spaces_srtp_gcm_available())
        return SPACES_SRTP_UNAVAILABLE;
    if ((key_len != 16 && key_len != 32) || salt_len != 12)
        return SPACES_SRTP_BAD_KEY;
    memset(ctx, 0, sizeof *ctx);
    uint8_t session_key[32];
    int status = derive(master_key, key_len, master_salt, salt_len, 0x00, session_key, key_len);
    if (status == SPACES_SRTP_OK)
        status = derive(master_key, key_len, master_salt, salt_len, 0x02, ctx->salt, 12);
    if (status == SPACES_SRTP_OK)
        status = expand_key(session_key, key_len, ctx->round_keys, &ctx->rounds);
    memset(session_key, 0, sizeof session_key);
    if (status != SPACES_SRTP_OK)
        return status;
    hash_key_of(ctx->round_keys, ctx->rounds, ctx->hash_key);
    return SPACES_SRTP_OK;
}

int spaces_srtp_gcm_protect(void *ctx_address, void *packet, int *len)
{
    struct spaces_srtp_gcm *ctx = ctx_address;
    uint8_t *p = packet;
    int size = *len;
    if (size < 12 || (p[0] >> 6) != 2)
        return SPACES_SRTP_BAD_PACKET;
    int header = 12 + 4 * (p[0] & 0x0f);
    if (p[0] & 0x10) {
        if (size < header + 4)
            return SPACES_SRTP_BAD_PACKET;
        header += 4 + 4 * ((p[header + 2] << 8) | p[header + 3]);
    }
    if (header > size)
        return SPACES_SRTP_BAD_PACKET;
    uint16_t seq = (uint16_t)((p[2] << 8) | p[3]);
    uint32_t ssrc = load_be32(p + 8);
    int created = 0;
    struct ssrc_state *state = ssrc_state(ctx, ssrc, seq, &created);
    if (state == NULL)
        return SPACES_SRTP_TOO_MANY_SSRCS;
    uint32_t roc;
    int status = next_index(state, seq, &roc);
    if (status != SPACES_SRTP_OK)
        return status;
    if (created)
        ctx->ssrc_count++;
    /* RFC 7714 section 8.1: IV = (0x0000 || SSRC || ROC || SEQ) XOR salt. */
    uint8_t iv[12];
    iv[0] = ctx->salt[0];
    iv[1] = ctx->salt[1];
    for (int i = 0; i < 4; i++) {
        iv[2 + i] = ctx->salt[2 + i] ^ p[8 + i];
        iv[6 + i] = ctx->salt[6 + i] ^ (uint8_t)(roc >> (24 - 8 * i));
    }
    iv[10] = ctx->salt[10] ^ p[2];
    iv[11] = ctx->salt[11] ^ p[3];
    gcm_encrypt(ctx->round_keys, ctx->rounds, ctx->hash_key, iv, p, (size_t)header, p + header,
                (size_t)(size - header), p + size);
    *len = size + 16;
    return SPACES_SRTP_OK;
}

int spaces_aes_gcm_encrypt(const uint8_t *key, int key_len, const uint8_t *iv,
                           const uint8_t *aad, size_t aad_len, uint8_t *text, size_t text_len,
                           uint8_t *tag)
{
    if (!spaces_srtp_gcm_available())
        return SPACES_SRTP_UNAVAILABLE;
    uint8_t rk[15][16];
    int rounds;
    int status = expand_key(key, key_len, rk, &rounds);
    if (status != SPACES_SRTP_OK)
        return status;
    uint64_t hash_key[2];
    hash_key_of(rk, rounds, hash_key);
    gcm_encrypt(rk, rounds, hash_key, iv, aad, aad_len, text, text_len, tag);
    return SPACES_SRTP_OK;
}

#else /* no AES-NI build: the egress path keeps libsrtp */

int spaces_srtp_gcm_available(void) { return 0; }

int spaces_srtp_gcm_init(void *ctx, const uint8_t *master_key, int key_len,
                         const uint8_t *master_salt, int salt_len)
{
    (void)ctx, (void)master_key, (void)key_len, (void)master_salt, (void)salt_len;
    return SPACES_SRTP_UNAVAILABLE;
}

int spaces_srtp_gcm_protect(void *ctx, void *packet, int *len)
{
    (void)ctx, (void)packet, (void)len;
    return SPACES_SRTP_UNAVAILABLE;
}

int spaces_aes_gcm_encrypt(const uint8_t *key, int key_len, const uint8_t *iv,
                           const uint8_t *aad, size_t aad_len, uint8_t *text, size_t text_len,
                           uint8_t *tag)
{
    (void)key, (void)key_len, (void)iv, (void)aad, (void)aad_len, (void)text, (void)text_len,
        (void)tag;
    return SPACES_SRTP_UNAVAILABLE;
}

#endif
