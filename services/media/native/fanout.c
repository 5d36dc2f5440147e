/*
 * The egress inner loop of the media fast path: one RTP packet to every listener of a
 * plan, in C so no Python runs per listener.
 *
 * For each listener i of the plan (in chunks of `chunk` listeners):
 *   copy the plaintext into buffer i, protect it in place with listener i's SRTP
 *   context, set the iovec length of message i to the protected length;
 * then one sendmmsg(2) per chunk, and the time the chunk left (CLOCK_MONOTONIC, the clock
 * of Python's time.perf_counter on Linux) for the forwarding latency histogram.
 *
 * A fan-out can be split across helper threads (a pool made by spaces_fanout_pool_new):
 * the calling thread sends the first run of chunks and each helper one of the others, at
 * the same time, so the last listener's packet leaves sooner. Helpers are plain pthreads
 * that never touch Python, so they need no GIL. A helper only touches a plan during the
 * call that hands it a run and the caller waits for every helper before it returns, so a
 * plan still belongs to the one thread that calls this for it (libsrtp contexts and the
 * native AES-GCM contexts are not shared), and every listener is still protected by one
 * thread at a time, in packet order.
 *
 * Every pointer comes in as an address (uintptr_t): the buffers and message headers are
 * allocated through other cffi instances (pylibsrtp's, the egress module's), and the
 * protect function is either pylibsrtp's own compiled srtp_protect (so this module links
 * nothing) or this module's spaces_srtp_gcm_protect; all listeners of a plan use one.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

enum { PREFETCH_AHEAD = 2 };
enum { MAX_HELPERS = 7 };

typedef int (*srtp_protect_fn)(void *ctx, void *rtp_hdr, int *len_ptr);

enum { TOTAL_SENT, TOTAL_BYTES, TOTAL_SRTP_FAILED, TOTAL_SEND_FAILED, TOTAL_COUNT };

/* What one fan-out works on; shared read-only by the threads it is split across. */
struct fanout_job {
    srtp_protect_fn protect;
    int fd;
    void *const *sessions;
    char *buffers;
    size_t stride;
    int *lengths;
    struct mmsghdr *msgs;
    int chunk;
    const char *packet;
    int size;
    double *chunk_done;
    int *chunk_sent;
};

/* Send messages [a, b); count what left and what the kernel refused. */
static void send_run(int fd, struct mmsghdr *msgs, int a, int b, long *totals, int *sent)
{
    int offset = a;
    while (offset < b) {
        int result = sendmmsg(fd, msgs + offset, (unsigned int)(b - offset), 0);
        if (result > 0) {
            for (int i = offset; i < offset + result; i++)
                totals[TOTAL_BYTES] += (long)msgs[i].msg_hdr.msg_iov[0].iov_len;
            totals[TOTAL_SENT] += result;
            *sent += result;
            offset += result;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
            /* The socket buffer is full: the rest of this run is dropped, not queued. */
            totals[TOTAL_SEND_FAILED] += b - offset;
            return;
        }
        /* This message's destination was refused; skip it and go on. */
        totals[TOTAL_SEND_FAILED] += 1;
        offset += 1;
    }
}

/* Fan out to listeners [start, end), `start` on a chunk boundary; chunk k's time and
 * count go to chunk_done[k] and chunk_sent[k]. Adds to `totals`. */
static void fanout_range(const struct fanout_job *job, int start, int end, long *totals)
{
    struct timespec now;
    for (int a = start; a < end; a += job->chunk) {
        int b = a + job->chunk < end ? a + job->chunk : end;
        int run_start = a;
        int sent = 0;
        for (int i = a; i < b; i++) {
            if (i + PREFETCH_AHEAD < end) {
                /* A fan-out visits a thousand cold contexts: fetch the next ones early. */
                const char *next = job->sessions[i + PREFETCH_AHEAD];
                for (int line = 0; line < SPACES_SRTP_GCM_HOT_BYTES; line += 64)
                    __builtin_prefetch(next + line);
            }
            char *buffer = job->buffers + (size_t)i * job->stride;
            memcpy(buffer, job->packet, (size_t)job->size);
            job->lengths[i] = job->size;
            if (job->protect(job->sessions[i], buffer, &job->lengths[i]) != 0) {
                totals[TOTAL_SRTP_FAILED] += 1;
                send_run(job->fd, job->msgs, run_start, i, totals, &sent);
                run_start = i + 1;
                continue;
            }
            job->msgs[i].msg_hdr.msg_iov[0].iov_len = (size_t)job->lengths[i];
        }
        send_run(job->fd, job->msgs, run_start, b, totals, &sent);
        clock_gettime(CLOCK_MONOTONIC, &now);
        int k = a / job->chunk;
        job->chunk_done[k] = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
        job->chunk_sent[k] = sent;
    }
}

/* One helper thread and the run of listeners it is handed. */
struct helper {
    pthread_t thread;
    int fd; /* the socket this helper sends on, or -1 for the caller's */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_cond_t idle;
    int busy;
    int stop;
    const struct fanout_job *job;
    int start, end;
    long totals[TOTAL_COUNT];
};

struct spaces_fanout_pool {
    int helpers;
    int cpus;            /* CPUs this process may run on */
    cpu_set_t allowed;   /* which */
    int caller_cpu;      /* the CPU the helpers were last kept off */
    struct helper helper[MAX_HELPERS];
};

/*
 * Keep the helpers off the CPU the calling thread runs on. Left alone, the scheduler
 * often wakes a helper on its waker's CPU (wake-affine: the waker looks about to sleep),
 * and the two halves of the fan-out then take turns on one CPU: measured on 2 vCPUs, 42%
 * of fan-outs, and most of the slow ones. The mask changes only when the caller has
 * moved to another CPU.
 */
static void keep_helpers_off(struct spaces_fanout_pool *pool)
{
    int cpu = sched_getcpu();
    if (cpu < 0 || cpu == pool->caller_cpu || !CPU_ISSET(cpu, &pool->allowed))
        return;
    cpu_set_t others = pool->allowed;
    CPU_CLR(cpu, &others);
    for (int h = 0; h < pool->helpers; h++)
        pthread_setaffinity_np(pool->helper[h].thread, sizeof others, &others);
    pool->caller_cpu = cpu;
}

static void *helper_main(void *arg)
{
    struct helper *helper = (struct helper *)arg;
    pthread_mutex_lock(&helper->lock);
    for (;;) {
        while (!helper->busy && !helper->stop)
            pthread_cond_wait(&helper->wake, &helper->lock);
        if (helper->stop)
            break;
        struct fanout_job job = *helper->job;
        int start = helper->start, end = helper->end;
        if (helper->fd >= 0)
            job.fd = helper->fd;
        pthread_mutex_unlock(&helper->lock);
        long totals[TOTAL_COUNT] = {0};
        fanout_range(&job, start, end, totals);
        pthread_mutex_lock(&helper->lock);
        memcpy(helper->totals, totals, sizeof totals);
        helper->busy = 0;
        pthread_cond_signal(&helper->idle);
    }
    pthread_mutex_unlock(&helper->lock);
    return NULL;
}

/* Start `helpers` helper threads (at most MAX_HELPERS); NULL if none could start. */
void *spaces_fanout_pool_new(int helpers)
{
    if (helpers < 1)
        return NULL;
    if (helpers > MAX_HELPERS)
        helpers = MAX_HELPERS;
    struct spaces_fanout_pool *pool = calloc(1, sizeof *pool);
    if (pool == NULL)
        return NULL;
    if (sched_getaffinity(0, sizeof pool->allowed, &pool->allowed) != 0)
        CPU_ZERO(&pool->allowed);
    pool->cpus = CPU_COUNT(&pool->allowed);
    pool->caller_cpu = -1;
    for (int h = 0; h < helpers; h++) {
        struct helper *helper = &pool->helper[h];
        helper->fd = -1;
        pthread_mutex_init(&helper->lock, NULL);
        pthread_cond_init(&helper->wake, NULL);
        pthread_cond_init(&helper->idle, NULL);
        if (pthread_create(&helper->thread, NULL, helper_main, helper) != 0) {
            pthread_cond_destroy(&helper->idle);
            pthread_cond_destroy(&helper->wake);
            pthread_mutex_destroy(&helper->lock);
            break;
        }
        pool->helpers++;
    }
    if (pool->helpers == 0) {
        free(pool);
        return NULL;
    }
    return pool;
}

/* How many threads a fan-out is split across at most: the caller and the pool's helpers,
 * but no more than there are CPUs to run them (a split on one CPU only adds switches). */
int spaces_fanout_pool_parts(void *pool_address)
{
    struct spaces_fanout_pool *pool = pool_address;
    if (pool == NULL)
        return 1;
    int parts = pool->helpers + 1;
    if (parts > pool->cpus)
        parts = pool->cpus;
    return parts < 1 ? 1 : parts;
}

/* Let helper `index` send on its own socket (one on the same address and port as the
 * caller's, that nothing polls): threads sending on one socket contend for it. */
void spaces_fanout_pool_set_fd(void *pool_address, int index, int fd)
{
    struct spaces_fanout_pool *pool = pool_address;
    if (pool == NULL || index < 0 || index >= pool->helpers)
        return;
    struct helper *helper = &pool->helper[index];
    pthread_mutex_lock(&helper->lock);
    helper->fd = fd;
    pthread_mutex_unlock(&helper->lock);
}

/* How many helper threads a pool runs. */
int spaces_fanout_pool_size(void *pool_address)
{
    struct spaces_fanout_pool *pool = pool_address;
    return pool == NULL ? 0 : pool->helpers;
}

/* Stop a pool's threads (after the fan-out they may be in) and free it. */
void spaces_fanout_pool_free(void *pool_address)
{
    struct spaces_fanout_pool *pool = pool_address;
    if (pool == NULL)
        return;
    for (int h = 0; h < pool->helpers; h++) {
        struct helper *helper = &pool->helper[h];
        pthread_mutex_lock(&helper->lock);
        helper->stop = 1;
        pthread_cond_signal(&helper->wake);
        pthread_mutex_unlock(&helper->lock);
        pthread_join(helper->thread, NULL);
        pthread_cond_destroy(&helper->idle);
        pthread_cond_destroy(&helper->wake);
        pthread_mutex_destroy(&helper->lock);
    }
    free(pool);
}

/*
 * Fan `packet` out to the `count` listeners of a plan; returns the number of chunks,
 * whose times and counts are in chunk_done[0..] and chunk_sent[0..], and fills totals.
 * With a pool and at least two chunks of listeners, the chunks are split into even runs
 * across the calling thread and the pool's helpers.
 */
int spaces_fanout(void *pool_address, uintptr_t protect_address, int fd,
                  uintptr_t sessions_address, uintptr_t buffers_address, size_t stride,
                  uintptr_t lengths_address, uintptr_t msgs_address, int count, int chunk,
                  const char *packet, int size, double *chunk_done, int *chunk_sent,
                  long *totals)
{
    struct spaces_fanout_pool *pool = pool_address;
    struct fanout_job job = {
        .protect = (srtp_protect_fn)protect_address,
        .fd = fd,
        .sessions = (void *const *)sessions_address,
        .buffers = (char *)buffers_address,
        .stride = stride,
        .lengths = (int *)lengths_address,
        .msgs = (struct mmsghdr *)msgs_address,
        .chunk = chunk,
        .packet = packet,
        .size = size,
        .chunk_done = chunk_done,
        .chunk_sent = chunk_sent,
    };
    int chunks = (count + chunk - 1) / chunk;
    int parts = spaces_fanout_pool_parts(pool);
    if (parts > chunks)
        parts = chunks;

    for (int k = 0; k < TOTAL_COUNT; k++)
        totals[k] = 0;
    if (parts <= 1) {
        fanout_range(&job, 0, count, totals);
        return chunks;
    }
    keep_helpers_off(pool);
    /* Runs of whole chunks: the first `extra` runs take one chunk more. */
    int per_part = chunks / parts, extra = chunks % parts;
    int own_end = (per_part + (extra > 0)) * chunk;
    int start = own_end;
    for (int p = 1; p < parts; p++) {
        int run = (per_part + (p < extra)) * chunk;
        struct helper *helper = &pool->helper[p - 1];
        pthread_mutex_lock(&helper->lock);
        helper->job = &job;
        helper->start = start;
        helper->end = start + run < count ? start + run : count;
        helper->busy = 1;
        pthread_cond_signal(&helper->wake);
        pthread_mutex_unlock(&helper->lock);
        start += run;
    }
    fanout_range(&job, 0, own_end, totals);
    for (int p = 1; p < parts; p++) {
        struct helper *helper = &pool->helper[p - 1];
        pthread_mutex_lock(&helper->lock);
        while (helper->busy)
            pthread_cond_wait(&helper->idle, &helper->lock);
        for (int k = 0; k < TOTAL_COUNT; k++)
            totals[k] += helper->totals[k];
        pthread_mutex_unlock(&helper->lock);
    }
    return chunks;
}
