/* The consent plane: see consent_plane.h. */
#define _GNU_SOURCE
#include "consent_plane.h"
#include "stun.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum {
    BATCH = 32,
    MAX_DATAGRAM = 4096,
    MAX_CREDENTIAL = 256, /* RFC 8445 section 5.3: ufrag and password at most 256 chars */
    MAX_REPLY = 20 + 24 + 32,
    BINDING_REQUEST = 0x0001,
    BINDING_SUCCESS = 0x0101,
    BINDING_ERROR = 0x0111,
    ATTR_XOR_MAPPED_ADDRESS = 0x0020,
    MAGIC_COOKIE = 0x2112A442,
    MIN_BUCKETS = 1024
};

/* Where a session's checks come from, and how to answer them. */
struct answerer {
    struct answerer *next;
    uint8_t key[19]; /* family, port (2), address (16) */
    int conflict;
    int ufrag_size;
    int password_size;
    uint8_t credentials[]; /* ufrag, then password */
};

/* One of the node's checks awaiting its answer. */
struct expected {
    struct expected *next;
    uint8_t tid[12];
    int key_size;
    uint8_t key[];
};

struct table {
    void **buckets;
    size_t size; /* a power of two */
    size_t count;
};

struct plane {
    int stun_fd;
    int forward_fd;
    int stop_fd;
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    struct table answerers;
    struct table expected;
    struct spaces_consent_answer *answers;
    int answers_count;
    int answers_capacity;
    struct spaces_consent_stats stats;
    /* the thread's buffers */
    struct mmsghdr in[BATCH];
    struct iovec in_iov[BATCH];
    struct sockaddr_storage in_names[BATCH];
    uint8_t in_data[BATCH][SPACES_CONSENT_HEADER + MAX_DATAGRAM];
    struct mmsghdr out[BATCH];
    struct iovec out_iov[BATCH];
    uint8_t out_data[BATCH][MAX_REPLY];
};

static uint64_t hash_bytes(const uint8_t *data, int size)
{
    uint64_t hash = 1469598103934665603ULL; /* FNV-1a */
    for (int i = 0; i < size; i++)
        hash = (hash ^ data[i]) * 1099511628211ULL;
    return hash;
}

static int table_init(struct table *table)
{
    table->size = MIN_BUCKETS;
    table->count = 0;
    table->buckets = calloc(table->size, sizeof(void *));
    return table->buckets ? 0 : -1;
}

/* The nodes of both tables start with their `next` pointer. */
struct node {
    struct node *next;
};

static void table_clear(struct table *table)
{
    for (size_t i = 0; i < table->size; i++) {
        struct node *node = table->buckets[i];
        while (node) {
            struct node *next = node->next;
            free(node);
            node = next;
        }
    }
    free(table->buckets);
    table->buckets = NULL;
}

/* Double the buckets when the chains grow long; keeps the old ones when out of memory. */
static void table_grow(struct table *table, uint64_t (*hash)(const struct node *))
{
    if (table->count < table->size * 2)
        return;
    size_t size = table->size * 2;
    void **buckets = calloc(size, sizeof(void *));
    if (!buckets)
        return;
    for (size_t i = 0; i < table->size; i++) {
        struct node *node = table->buckets[i];
        while (node) {
            struct node *next = node->next;
            size_t at = hash(node) & (size - 1);
            node->next = buckets[at];
            buckets[at] = node;
            node = next;
        }
    }
    free(table->buckets);
    table->buckets = buckets;
    table->size = size;
}

static uint64_t answerer_hash(const struct node *node)
{
    return hash_bytes(((const struct answerer *)node)->key, 19);
}

static uint64_t expected_hash(const struct node *node)
{
    return hash_bytes(((const struct expected *)node)->tid, 12);
}

static int address_key(int family, const uint8_t *address, int port, uint8_t key[19])
{
    if (family != 4 && family != 6)
        return -1;
    memset(key, 0, 19);
    key[0] = (uint8_t)family;
    key[1] = (uint8_t)(port >> 8);
    key[2] = (uint8_t)port;
    memcpy(key + 3, address, family == 4 ? 4 : 16);
    return 0;
}

/* The key of a received datagram's source; -1 for other families. */
static int source_key(const struct sockaddr_storage *name, uint8_t key[19])
{
    if (name->ss_family == AF_INET) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)name;
        return address_key(4, (const uint8_t *)&in4->sin_addr, ntohs(in4->sin_port), key);
    }
    if (name->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)name;
        return address_key(6, (const uint8_t *)&in6->sin6_addr, ntohs(in6->sin6_port), key);
    }
    return -1;
}

static struct answerer **find_answerer(struct plane *plane, const uint8_t key[19])
{
    struct answerer **slot =
        (struct answerer **)&plane->answerers.buckets[hash_bytes(key, 19) &
                                                      (plane->answerers.size - 1)];
    while (*slot && memcmp((*slot)->key, key, 19) != 0)
        slot = &(*slot)->next;
    return slot;
}

static struct expected **find_expected(struct plane *plane, const uint8_t *tid)
{
    struct expected **slot =
        (struct expected **)&plane->expected.buckets[hash_bytes(tid, 12) &
                                                     (plane->expected.size - 1)];
    while (*slot && memcmp((*slot)->tid, tid, 12) != 0)
        slot = &(*slot)->next;
    return slot;
}

static double monotonic_now(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static int load_be16(const uint8_t *p) { return p[0] << 8 | p[1]; }

/* XOR-MAPPED-ADDRESS of the source (RFC 8489 section 14.2) into out; its length. */
static int xor_mapped_address(const uint8_t key[19], const uint8_t *tid, uint8_t *out)
{
    static const uint8_t cookie[4] = {0x21, 0x12, 0xA4, 0x42};
    int size = key[0] == 4 ? 4 : 16;
    out[0] = ATTR_XOR_MAPPED_ADDRESS >> 8;
    out[1] = ATTR_XOR_MAPPED_ADDRESS & 0xFF;
    out[2] = 0;
    out[3] = (uint8_t)(4 + size);
    out[4] = 0;
    out[5] = key[0] == 4 ? 1 : 2;
    out[6] = key[1] ^ cookie[0];
    out[7] = key[2] ^ cookie[1];
    for (int i = 0; i < size; i++)
        out[8 + i] = key[3 + i] ^ (i < 4 ? cookie[i] : tid[i - 4]);
    return 8 + size;
}

/* Answer a peer's consent check; the reply's length, 0 to forward the datagram. */
static int answer_check(struct plane *plane, const uint8_t *data, int size,
                        const uint8_t key[19], uint8_t *reply)
{
    struct answerer *answerer = *find_answerer(plane, key);
    if (!answerer)
        return 0;
    const uint8_t *password = answerer->credentials + answerer->ufrag_size;
    struct spaces_stun_check check;
    if (!spaces_stun_check(data, size, password, answerer->password_size, &check))
        return 0;
    if (check.type != BINDING_REQUEST || !check.authenticated || check.use_candidate ||
        (answerer->conflict && check.role == answerer->conflict) || check.username_at < 0)
        return 0;
    /* USERNAME is "<our ufrag>:<theirs>" */
    if (check.username_size <= answerer->ufrag_size ||
        data[check.username_at + answerer->ufrag_size] != ':' ||
        memcmp(data + check.username_at, answerer->credentials, answerer->ufrag_size) != 0)
        return 0;
    uint8_t body[24];
    int body_size = xor_mapped_address(key, data + 8, body);
    return spaces_stun_seal(reply, BINDING_SUCCESS, data + 8, body, body_size, password,
                            answerer->password_size);
}

/* Take an answer to one of the node's checks; 1 when the datagram was one (taken or
 * dropped as forged), 0 to forward it. */
static int take_answer(struct plane *plane, const uint8_t *data, int size, int type)
{
    struct expected **slot = find_expected(plane, data + 8);
    struct expected *expected = *slot;
    if (!expected)
        return 0;
    struct spaces_stun_check check;
    int valid = spaces_stun_check(data, size, expected->key, expected->key_size, &check);
    if (!valid || (type == BINDING_SUCCESS && !check.authenticated)) {
        plane->stats.dropped++; /* ours, but forged or corrupt: as if lost */
        return 1;
    }
    if (plane->answers_count == plane->answers_capacity) {
        int capacity = plane->answers_capacity ? plane->answers_capacity * 2 : 256;
        void *grown = realloc(plane->answers, (size_t)capacity * sizeof(*plane->answers));
        if (!grown) {
            plane->stats.dropped++;
            return 1;
        }
        plane->answers = grown;
        plane->answers_capacity = capacity;
    }
    struct spaces_consent_answer *answer = &plane->answers[plane->answers_count++];
    memcpy(answer->tid, data + 8, 12);
    answer->success = type == BINDING_SUCCESS;
    answer->when = monotonic_now();
    *slot = expected->next;
    free(expected);
    plane->expected.count--;
    plane->stats.verified++;
    return 1;
}

static void forward(struct plane *plane, uint8_t *frame, int size, const uint8_t key[19])
{
    frame[0] = key[0];
    frame[1] = 0;
    memcpy(frame + 2, key + 1, 18);
    if (send(plane->forward_fd, frame, (size_t)(SPACES_CONSENT_HEADER + size), MSG_DONTWAIT) < 0)
        plane->stats.dropped++;
    else
        plane->stats.forwarded++;
}

/* Read one batch; returns how many replies were written into plane->out. */
static int handle_batch(struct plane *plane, int received)
{
    int replies = 0;
    pthread_mutex_lock(&plane->lock);
    for (int i = 0; i < received; i++) {
        uint8_t *frame = plane->in_data[i];
        uint8_t *data = frame + SPACES_CONSENT_HEADER;
        int size = (int)plane->in[i].msg_len;
        uint8_t key[19];
        if (source_key(&plane->in_names[i], key) < 0)
            continue;
        int type = size >= 20 ? load_be16(data) : -1;
        if (type == BINDING_REQUEST) {
            int length = answer_check(plane, data, size, key, plane->out_data[replies]);
            if (length > 0) {
                plane->out_iov[replies].iov_len = (size_t)length;
                plane->out[replies].msg_hdr.msg_name = &plane->in_names[i];
                plane->out[replies].msg_hdr.msg_namelen = plane->in[i].msg_hdr.msg_namelen;
                replies++;
                continue;
            }
        } else if (type == BINDING_SUCCESS || type == BINDING_ERROR) {
            if (take_answer(plane, data, size, type))
                continue;
        }
        forward(plane, frame, size, key);
    }
    pthread_mutex_unlock(&plane->lock);
    return replies;
}

static void *plane_main(void *argument)
{
    struct plane *plane = argument;
    struct pollfd fds[2] = {{plane->stun_fd, POLLIN, 0}, {plane->stop_fd, POLLIN, 0}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[1].revents)
            break;
        for (int i = 0; i < BATCH; i++)
            plane->in[i].msg_hdr.msg_namelen = sizeof(plane->in_names[i]);
        int received = recvmmsg(plane->stun_fd, plane->in, BATCH, MSG_DONTWAIT, NULL);
        if (received <= 0)
            continue;
        int replies = handle_batch(plane, received);
        if (replies > 0) {
            int sent = sendmmsg(plane->stun_fd, plane->out, (unsigned)replies, MSG_DONTWAIT);
            int answered = sent > 0 ? sent : 0;
            pthread_mutex_lock(&plane->lock);
            plane->stats.answered += (uint64_t)answered;
            plane->stats.dropped += (uint64_t)(replies - answered);
            pthread_mutex_unlock(&plane->lock);
        }
    }
    return NULL;
}

void *spaces_consent_new(int stun_fd, int forward_fd)
{
    struct plane *plane = calloc(1, sizeof(*plane));
    if (!plane)
        return NULL;
    plane->stun_fd = stun_fd;
    plane->forward_fd = forward_fd;
    pthread_mutex_init(&plane->lock, NULL);
    plane->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (plane->stop_fd < 0 || table_init(&plane->answerers) || table_init(&plane->expected)) {
        spaces_consent_free(plane);
        return NULL;
    }
    for (int i = 0; i < BATCH; i++) {
        plane->in_iov[i].iov_base = plane->in_data[i] + SPACES_CONSENT_HEADER;
        plane->in_iov[i].iov_len = MAX_DATAGRAM;
        plane->in[i].msg_hdr.msg_iov = &plane->in_iov[i];
        plane->in[i].msg_hdr.msg_iovlen = 1;
        plane->in[i].msg_hdr.msg_name = &plane->in_names[i];
        plane->out_iov[i].iov_base = plane->out_data[i];
        plane->out[i].msg_hdr.msg_iov = &plane->out_iov[i];
        plane->out[i].msg_hdr.msg_iovlen = 1;
    }
    /* Signals stay with Python's main thread. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    int failed = pthread_create(&plane->thread, NULL, plane_main, plane);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (failed) {
        spaces_consent_free(plane);
        return NULL;
    }
    plane->started = 1;
    return plane;
}

void spaces_consent_free(void *address)
{
    struct plane *plane = address;
    if (!plane)
        return;
    if (plane->started) {
        uint64_t one = 1;
        while (write(plane->stop_fd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
        pthread_join(plane->thread, NULL);
    }
    pthread_mutex_destroy(&plane->lock);
    if (plane->stop_fd >= 0)
        close(plane->stop_fd);
    if (plane->answerers.buckets)
        table_clear(&plane->answerers);
    if (plane->expected.buckets)
        table_clear(&plane->expected);
    free(plane->answers);
    free(plane);
}

int spaces_consent_answer_for(void *address, int family, const uint8_t *host, int port,
                              const char *ufrag, int ufrag_size, const uint8_t *password,
                              int password_size, int conflict)
{
    struct plane *plane = address;
    uint8_t key[19];
    if (address_key(family, host, port, key) < 0 || ufrag_size < 1 ||
        ufrag_size > MAX_CREDENTIAL || password_size < 1 || password_size > MAX_CREDENTIAL)
        return -1;
    struct answerer *answerer = malloc(sizeof(*answerer) + (size_t)(ufrag_size + password_size));
    if (!answerer)
        return -1;
    memcpy(answerer->key, key, 19);
    answerer->conflict = conflict;
    answerer->ufrag_size = ufrag_size;
    answerer->password_size = password_size;
    memcpy(answerer->credentials, ufrag, (size_t)ufrag_size);
    memcpy(answerer->credentials + ufrag_size, password, (size_t)password_size);
    pthread_mutex_lock(&plane->lock);
    struct answerer **slot = find_answerer(plane, key);
    if (*slot) {
        answerer->next = (*slot)->next;
        free(*slot);
    } else {
        answerer->next = NULL;
        plane->answerers.count++;
    }
    *slot = answerer;
    table_grow(&plane->answerers, answerer_hash);
    pthread_mutex_unlock(&plane->lock);
    return 0;
}

void spaces_consent_forget(void *address, int family, const uint8_t *host, int port)
{
    struct plane *plane = address;
    uint8_t key[19];
    if (address_key(family, host, port, key) < 0)
        return;
    pthread_mutex_lock(&plane->lock);
    struct answerer **slot = find_answerer(plane, key);
    struct answerer *answerer = *slot;
    if (answerer) {
        *slot = answerer->next;
        free(answerer);
        plane->answerers.count--;
    }
    pthread_mutex_unlock(&plane->lock);
}

int spaces_consent_expect(void *address, const uint8_t *tid, const uint8_t *key, int key_size)
{
    struct plane *plane = address;
    if (key_size < 0 || key_size > MAX_CREDENTIAL)
        return -1;
    struct expected *expected = malloc(sizeof(*expected) + (size_t)key_size);
    if (!expected)
        return -1;
    memcpy(expected->tid, tid, 12);
    expected->key_size = key_size;
    memcpy(expected->key, key, (size_t)key_size);
    pthread_mutex_lock(&plane->lock);
    struct expected **slot = find_expected(plane, tid);
    if (*slot) {
        expected->next = (*slot)->next;
        free(*slot);
    } else {
        expected->next = NULL;
        plane->expected.count++;
    }
    *slot = expected;
    table_grow(&plane->expected, expected_hash);
    pthread_mutex_unlock(&plane->lock);
    return 0;
}

void spaces_consent_unexpect(void *address, const uint8_t *tid)
{
    struct plane *plane = address;
    pthread_mutex_lock(&plane->lock);
    struct expected **slot = find_expected(plane, tid);
    struct expected *expected = *slot;
    if (expected) {
        *slot = expected->next;
        free(expected);
        plane->expected.count--;
    }
    pthread_mutex_unlock(&plane->lock);
}

int spaces_consent_take(void *address, struct spaces_consent_answer *out, int max)
{
    struct plane *plane = address;
    pthread_mutex_lock(&plane->lock);
    int taken = plane->answers_count < max ? plane->answers_count : max;
    memcpy(out, plane->answers, (size_t)taken * sizeof(*out));
    memmove(plane->answers, plane->answers + taken,
            (size_t)(plane->answers_count - taken) * sizeof(*out));
    plane->answers_count -= taken;
    pthread_mutex_unlock(&plane->lock);
    return taken;
}

void spaces_consent_stats(void *address, struct spaces_consent_stats *out)
{
    struct plane *plane = address;
    pthread_mutex_lock(&plane->lock);
    *out = plane->stats;
    pthread_mutex_unlock(&plane->lock);
}
