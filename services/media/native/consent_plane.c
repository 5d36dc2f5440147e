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
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum {
    BATCH = 32,
    MAX_DATAGRAM = 4096,
    MAX_CREDENTIAL = 256, /* RFC 8445 section 5.3: ufrag and password at most 256 chars */
    MAX_BODY = 544,       /* USERNAME of two credentials and a colon, PRIORITY, the role */
    MAX_REPLY = 20 + 24 + 32,
    MAX_CHECK = 20 + MAX_BODY + 32,
    BINDING_REQUEST = 0x0001,
    BINDING_SUCCESS = 0x0101,
    BINDING_ERROR = 0x0111,
    ATTR_XOR_MAPPED_ADDRESS = 0x0020,
    MIN_BUCKETS = 1024
};

static const double SLACK_S = 0.05; /* checks due this soon go out with the ones due now */

/* Where a session's checks come from, and how to answer them. */
struct answerer {
    struct answerer *next;
    uint8_t key[19]; /* family, port (2), address (16) */
    int conflict;
    int ufrag_size;
    int password_size;
    uint8_t credentials[]; /* ufrag, then password */
};

/* A session the node checks. */
struct target {
    struct target *next;
    uint64_t id;
    int heap_at; /* index in the due heap */
    double due;
    double last_answer;
    int failures;
    int paused;
    int pending; /* a check awaits its answer (pending_tid) */
    uint8_t pending_tid[12];
    uint8_t address[19];
    int body_size;
    int key_size;
    uint8_t body[MAX_BODY];
    uint8_t key[MAX_CREDENTIAL];
};

/* A check awaiting its answer: transaction id to target, and the key the check was
 * signed with (an ICE restart may change the target's since). */
struct expected {
    struct expected *next;
    uint8_t tid[12];
    uint64_t target;
    int key_size;
    uint8_t key[MAX_CREDENTIAL];
};

struct table {
    void **buckets;
    size_t size; /* a power of two */
    size_t count;
};

/* A check built under the lock, sent after it. */
struct outgoing {
    struct sockaddr_storage name;
    socklen_t name_size;
    int size;
    uint8_t data[MAX_CHECK];
};

struct plane {
    int stun_fd;
    int forward_fd;
    int wake_fd;
    int stopping;
    double interval;
    int failures;
    double timeout;
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    struct table answerers;
    struct table targets;
    struct table expected;
    struct target **heap;
    int heap_size;
    int heap_capacity;
    struct spaces_consent_stats stats;
    uint64_t random_state;
    /* the thread's buffers */
    struct mmsghdr in[BATCH];
    struct iovec in_iov[BATCH];
    struct sockaddr_storage in_names[BATCH];
    uint8_t in_data[BATCH][SPACES_CONSENT_HEADER + MAX_DATAGRAM];
    struct mmsghdr out[BATCH];
    struct iovec out_iov[BATCH];
    uint8_t out_data[BATCH][MAX_REPLY];
    struct outgoing checks[BATCH];
};

/* -- tables --------------------------------------------------------------------------- */

/* The nodes of every table start with their `next` pointer. */
struct node {
    struct node *next;
};

static uint64_t hash_bytes(const uint8_t *data, int size)
{
    uint64_t hash = 1469598103934665603ULL; /* FNV-1a */
    for (int i = 0; i < size; i++)
        hash = (hash ^ data[i]) * 1099511628211ULL;
    return hash;
}

static uint64_t hash_id(uint64_t id) { return id * 0x9E3779B97F4A7C15ULL; }

static uint64_t answerer_hash(const struct node *node)
{
    return hash_bytes(((const struct answerer *)node)->key, 19);
}

static uint64_t target_hash(const struct node *node)
{
    return hash_id(((const struct target *)node)->id);
}

static uint64_t expected_hash(const struct node *node)
{
    return hash_bytes(((const struct expected *)node)->tid, 12);
}

static int table_init(struct table *table)
{
    table->size = MIN_BUCKETS;
    table->count = 0;
    table->buckets = calloc(table->size, sizeof(void *));
    return table->buckets ? 0 : -1;
}

static void table_clear(struct table *table)
{
    if (!table->buckets)
        return;
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

static struct answerer **find_answerer(struct plane *plane, const uint8_t key[19])
{
    struct table *table = &plane->answerers;
    struct answerer **slot =
        (struct answerer **)&table->buckets[hash_bytes(key, 19) & (table->size - 1)];
    while (*slot && memcmp((*slot)->key, key, 19) != 0)
        slot = &(*slot)->next;
    return slot;
}

static struct target **find_target(struct plane *plane, uint64_t id)
{
    struct table *table = &plane->targets;
    struct target **slot = (struct target **)&table->buckets[hash_id(id) & (table->size - 1)];
    while (*slot && (*slot)->id != id)
        slot = &(*slot)->next;
    return slot;
}

static struct expected **find_expected(struct plane *plane, const uint8_t *tid)
{
    struct table *table = &plane->expected;
    struct expected **slot =
        (struct expected **)&table->buckets[hash_bytes(tid, 12) & (table->size - 1)];
    while (*slot && memcmp((*slot)->tid, tid, 12) != 0)
        slot = &(*slot)->next;
    return slot;
}

/* -- the due heap (earliest check first) ------------------------------------------------ */

static void heap_swap(struct plane *plane, int a, int b)
{
    struct target *t = plane->heap[a];
    plane->heap[a] = plane->heap[b];
    plane->heap[b] = t;
    plane->heap[a]->heap_at = a;
    plane->heap[b]->heap_at = b;
}

static void heap_fix(struct plane *plane, int at)
{
    while (at > 0 && plane->heap[(at - 1) / 2]->due > plane->heap[at]->due) {
        heap_swap(plane, at, (at - 1) / 2);
        at = (at - 1) / 2;
    }
    for (;;) {
        int smallest = at, left = 2 * at + 1, right = 2 * at + 2;
        if (left < plane->heap_size && plane->heap[left]->due < plane->heap[smallest]->due)
            smallest = left;
        if (right < plane->heap_size && plane->heap[right]->due < plane->heap[smallest]->due)
            smallest = right;
        if (smallest == at)
            return;
        heap_swap(plane, at, smallest);
        at = smallest;
    }
}

static int heap_push(struct plane *plane, struct target *target)
{
    if (plane->heap_size == plane->heap_capacity) {
        int capacity = plane->heap_capacity ? plane->heap_capacity * 2 : 1024;
        void *grown = realloc(plane->heap, (size_t)capacity * sizeof(*plane->heap));
        if (!grown)
            return -1;
        plane->heap = grown;
        plane->heap_capacity = capacity;
    }
    target->heap_at = plane->heap_size;
    plane->heap[plane->heap_size++] = target;
    heap_fix(plane, target->heap_at);
    return 0;
}

static void heap_remove(struct plane *plane, struct target *target)
{
    int at = target->heap_at;
    int last = --plane->heap_size;
    if (at != last) {
        heap_swap(plane, at, last);
        heap_fix(plane, at);
    }
    target->heap_at = -1;
}

/* -- helpers ------------------------------------------------------------------------------ */

static double monotonic_now(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* Uniform in [0, 1) (xorshift64*: for the checks' jitter, not for secrets). */
static double uniform(struct plane *plane)
{
    uint64_t x = plane->random_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    plane->random_state = x;
    return (double)((x * 2685821657736338717ULL) >> 11) * (1.0 / 9007199254740992.0);
}

static int load_be16(const uint8_t *p) { return p[0] << 8 | p[1]; }

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

/* The socket address of a key. */
static socklen_t key_name(const uint8_t key[19], struct sockaddr_storage *name)
{
    memset(name, 0, sizeof(*name));
    int port = key[1] << 8 | key[2];
    if (key[0] == 4) {
        struct sockaddr_in *in4 = (struct sockaddr_in *)name;
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        memcpy(&in4->sin_addr, key + 3, 4);
        return sizeof(*in4);
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)name;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    memcpy(&in6->sin6_addr, key + 3, 16);
    return sizeof(*in6);
}

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

static void send_frame(struct plane *plane, const uint8_t *frame, int size)
{
    if (send(plane->forward_fd, frame, (size_t)size, MSG_DONTWAIT) < 0)
        plane->stats.dropped++;
    else
        plane->stats.forwarded++;
}

static void send_event(struct plane *plane, int event, uint64_t id)
{
    uint8_t frame[SPACES_CONSENT_HEADER] = {0, (uint8_t)event};
    for (int i = 0; i < 8; i++)
        frame[4 + i] = (uint8_t)(id >> (8 * i));
    if (send(plane->forward_fd, frame, sizeof(frame), MSG_DONTWAIT) < 0)
        plane->stats.dropped++;
}

static void forward(struct plane *plane, uint8_t *frame, int size, const uint8_t key[19])
{
    frame[0] = key[0];
    frame[1] = 0;
    memcpy(frame + 2, key + 1, 18);
    send_frame(plane, frame, SPACES_CONSENT_HEADER + size);
}

/* -- tracked sessions --------------------------------------------------------------------- */

static void drop_pending(struct plane *plane, struct target *target)
{
    if (!target->pending)
        return;
    struct expected **slot = find_expected(plane, target->pending_tid);
    struct expected *expected = *slot;
    if (expected) {
        *slot = expected->next;
        free(expected);
        plane->expected.count--;
    }
    target->pending = 0;
}

static void remove_target(struct plane *plane, struct target **slot)
{
    struct target *target = *slot;
    drop_pending(plane, target);
    if (target->heap_at >= 0)
        heap_remove(plane, target);
    *slot = target->next;
    plane->targets.count--;
    free(target);
}

static void expire(struct plane *plane, struct target *target)
{
    plane->stats.expired++;
    send_event(plane, SPACES_CONSENT_EXPIRED, target->id);
    remove_target(plane, find_target(plane, target->id));
}

/* A miss; returns 1 when it expired the session (then freed). */
static int miss(struct plane *plane, struct target *target)
{
    plane->stats.missed++;
    target->failures++;
    send_event(plane, SPACES_CONSENT_MISS, target->id);
    if (target->failures >= plane->failures) {
        expire(plane, target);
        return 1;
    }
    return 0;
}

static void schedule(struct plane *plane, struct target *target, double now)
{
    double due = now + plane->interval * (0.8 + 0.4 * uniform(plane));
    double limit = target->last_answer + plane->timeout;
    target->due = due < limit ? due : limit;
    heap_push(plane, target); /* the slot is there: the target left the heap to get here */
}

/* One due check of `target` (taken off the heap): judge the last one, send the next into
 * *out when there is one. Returns 1 when a check was written. */
static int check(struct plane *plane, struct target *target, double now, struct outgoing *out)
{
    if (target->pending) {
        drop_pending(plane, target);
        if (miss(plane, target))
            return 0;
    }
    if (target->paused) {
        target->last_answer = now; /* consent not assessed: its clock stands still */
        schedule(plane, target, now);
        return 0;
    }
    if (now - target->last_answer >= plane->timeout) {
        expire(plane, target);
        return 0;
    }
    struct expected *expected = malloc(sizeof(*expected));
    uint8_t tid[12];
    if (!expected || getrandom(tid, sizeof(tid), 0) != (ssize_t)sizeof(tid)) {
        free(expected);
        plane->stats.dropped++; /* counts as unanswered at the next check */
        schedule(plane, target, now);
        return 0;
    }
    memcpy(expected->tid, tid, 12);
    expected->target = target->id;
    expected->key_size = target->key_size;
    memcpy(expected->key, target->key, (size_t)target->key_size);
    struct expected **slot = find_expected(plane, tid);
    expected->next = *slot; /* a repeated random id is astronomically unlikely */
    *slot = expected;
    plane->expected.count++;
    table_grow(&plane->expected, expected_hash);
    memcpy(target->pending_tid, tid, 12);
    target->pending = 1;
    out->name_size = key_name(target->address, &out->name);
    out->size = spaces_stun_seal(out->data, BINDING_REQUEST, tid, target->body,
                                 target->body_size, target->key, target->key_size);
    schedule(plane, target, now);
    return 1;
}

/* Judge and send the checks due by now (plus the slack); returns seconds until the next
 * one, or -1 when nothing is tracked. */
static double run_checks(struct plane *plane)
{
    for (;;) {
        int count = 0;
        double now = monotonic_now();
        pthread_mutex_lock(&plane->lock);
        double horizon = now + (SLACK_S < plane->interval / 10 ? SLACK_S : plane->interval / 10);
        while (count < BATCH && plane->heap_size > 0 && plane->heap[0]->due <= horizon) {
            struct target *target = plane->heap[0];
            heap_remove(plane, target);
            count += check(plane, target, now, &plane->checks[count]);
        }
        double next = plane->heap_size > 0 ? plane->heap[0]->due - now : -1.0;
        int more = plane->heap_size > 0 && plane->heap[0]->due <= horizon;
        pthread_mutex_unlock(&plane->lock);
        int sent = 0;
        for (int i = 0; i < count; i++) {
            struct outgoing *out = &plane->checks[i];
            if (sendto(plane->stun_fd, out->data, (size_t)out->size, MSG_DONTWAIT,
                       (struct sockaddr *)&out->name, out->name_size) >= 0)
                sent++;
        }
        if (count) {
            pthread_mutex_lock(&plane->lock);
            plane->stats.checked += (uint64_t)sent;
            plane->stats.dropped += (uint64_t)(count - sent);
            pthread_mutex_unlock(&plane->lock);
        }
        if (!more)
            return next;
    }
}

/* -- what arrives --------------------------------------------------------------------------- */

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
    struct target *target = *find_target(plane, expected->target);
    if (!target) {
        *slot = expected->next; /* cannot happen: a target drops its pending check */
        free(expected);
        plane->expected.count--;
        return 1;
    }
    struct spaces_stun_check check;
    int valid = spaces_stun_check(data, size, expected->key, expected->key_size, &check);
    if (!valid || (type == BINDING_SUCCESS && !check.authenticated)) {
        plane->stats.dropped++; /* ours, but forged or corrupt: as if lost */
        return 1;
    }
    drop_pending(plane, target);
    plane->stats.verified++;
    if (type == BINDING_SUCCESS) {
        if (target->failures)
            send_event(plane, SPACES_CONSENT_RECOVERED, target->id);
        target->failures = 0;
        target->last_answer = monotonic_now();
    } else {
        miss(plane, target);
    }
    return 1;
}

/* Handle one batch read; returns how many replies were written into plane->out. */
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

static void read_socket(struct plane *plane)
{
    for (int i = 0; i < BATCH; i++)
        plane->in[i].msg_hdr.msg_namelen = sizeof(plane->in_names[i]);
    int received = recvmmsg(plane->stun_fd, plane->in, BATCH, MSG_DONTWAIT, NULL);
    if (received <= 0)
        return;
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

static void *plane_main(void *argument)
{
    struct plane *plane = argument;
    struct pollfd fds[2] = {{plane->stun_fd, POLLIN, 0}, {plane->wake_fd, POLLIN, 0}};
    for (;;) {
        double next = run_checks(plane);
        int timeout = next < 0 ? -1 : (int)(next * 1000.0) + 1;
        if (poll(fds, 2, timeout) < 0 && errno != EINTR)
            break;
        if (fds[1].revents) {
            uint64_t value;
            if (read(plane->wake_fd, &value, sizeof(value)) < 0 && errno != EAGAIN)
                break;
            pthread_mutex_lock(&plane->lock);
            int stopping = plane->stopping;
            pthread_mutex_unlock(&plane->lock);
            if (stopping)
                break;
        }
        if (fds[0].revents)
            read_socket(plane);
    }
    return NULL;
}

static void wake(struct plane *plane)
{
    uint64_t one = 1;
    while (write(plane->wake_fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

/* -- the API --------------------------------------------------------------------------------- */

void *spaces_consent_new(int stun_fd, int forward_fd, double interval, int failures)
{
    if (!(interval > 0) || failures < 1)
        return NULL;
    struct plane *plane = calloc(1, sizeof(*plane));
    if (!plane)
        return NULL;
    plane->stun_fd = stun_fd;
    plane->forward_fd = forward_fd;
    plane->wake_fd = -1;
    plane->interval = interval;
    plane->failures = failures;
    plane->timeout = failures * 1.2 * interval;
    pthread_mutex_init(&plane->lock, NULL);
    plane->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (getrandom(&plane->random_state, sizeof(plane->random_state), 0) !=
            (ssize_t)sizeof(plane->random_state) ||
        !plane->random_state)
        plane->random_state = 0x9E3779B97F4A7C15ULL ^ (uint64_t)time(NULL);
    if (plane->wake_fd < 0 || table_init(&plane->answerers) || table_init(&plane->targets) ||
        table_init(&plane->expected)) {
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
        pthread_mutex_lock(&plane->lock);
        plane->stopping = 1;
        pthread_mutex_unlock(&plane->lock);
        wake(plane);
        pthread_join(plane->thread, NULL);
    }
    pthread_mutex_destroy(&plane->lock);
    if (plane->wake_fd >= 0)
        close(plane->wake_fd);
    table_clear(&plane->answerers);
    table_clear(&plane->targets);
    table_clear(&plane->expected);
    free(plane->heap);
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

int spaces_consent_track(void *address, uint64_t id, int family, const uint8_t *host, int port,
                         const uint8_t *body, int body_size, const uint8_t *key, int key_size)
{
    struct plane *plane = address;
    uint8_t where[19];
    if (address_key(family, host, port, where) < 0 || body_size < 0 || body_size > MAX_BODY ||
        body_size % 4 || key_size < 0 || key_size > MAX_CREDENTIAL)
        return -1;
    int result = 0, woken = 0;
    pthread_mutex_lock(&plane->lock);
    struct target **slot = find_target(plane, id);
    struct target *target = *slot;
    if (!target) {
        target = calloc(1, sizeof(*target));
        if (!target) {
            result = -1;
            goto out;
        }
        target->id = id;
        double now = monotonic_now();
        target->last_answer = now;
        target->next = NULL;
        *slot = target;
        plane->targets.count++;
        target->heap_at = -1;
        schedule(plane, target, now);
        if (target->heap_at < 0) { /* no room in the heap */
            remove_target(plane, find_target(plane, id));
            result = -1;
            goto out;
        }
        woken = target->heap_at == 0;
        table_grow(&plane->targets, target_hash);
    }
    memcpy(target->address, where, 19);
    memcpy(target->body, body, (size_t)body_size);
    target->body_size = body_size;
    memcpy(target->key, key, (size_t)key_size);
    target->key_size = key_size;
    target->paused = 0;
out:
    pthread_mutex_unlock(&plane->lock);
    if (woken)
        wake(plane); /* the thread may be asleep until a later check */
    return result;
}

void spaces_consent_pause(void *address, uint64_t id)
{
    struct plane *plane = address;
    pthread_mutex_lock(&plane->lock);
    struct target *target = *find_target(plane, id);
    if (target)
        target->paused = 1;
    pthread_mutex_unlock(&plane->lock);
}

void spaces_consent_untrack(void *address, uint64_t id)
{
    struct plane *plane = address;
    pthread_mutex_lock(&plane->lock);
    struct target **slot = find_target(plane, id);
    if (*slot)
        remove_target(plane, slot);
    pthread_mutex_unlock(&plane->lock);
}

int spaces_consent_tracked(void *address)
{
    struct plane *plane = address;
    pthread_mutex_lock(&plane->lock);
    int count = (int)plane->targets.count;
    pthread_mutex_unlock(&plane->lock);
    return count;
}

void spaces_consent_stats(void *address, struct spaces_consent_stats *out)
{
    struct plane *plane = address;
    pthread_mutex_lock(&plane->lock);
    *out = plane->stats;
    pthread_mutex_unlock(&plane->lock);
}
