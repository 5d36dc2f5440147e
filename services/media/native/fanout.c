/*
 * The egress inner loop of the media fast path: one RTP packet to every listener of a
 * plan, in C so no Python runs per listener.
 *
 * For each listener i of the plan (in chunks of `chunk` listeners):
 *   copy the plaintext into buffer i, srtp_protect() it in place with listener i's
 *   libsrtp context, set the iovec length of message i to the protected length;
 * then one sendmmsg(2) per chunk, and the time the chunk left (CLOCK_MONOTONIC, the clock
 * of Python's time.perf_counter on Linux) for the forwarding latency histogram.
 *
 * Every pointer comes in as an address (uintptr_t): the buffers and message headers are
 * allocated through other cffi instances (pylibsrtp's, the egress module's), and the
 * protect function is either pylibsrtp's own compiled srtp_protect (so this module links
 * nothing) or this module's spaces_srtp_gcm_protect; all listeners of a plan use one.
 * Only the thread that owns a plan calls this for it (libsrtp contexts are not shared).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

enum { PREFETCH_AHEAD = 2 };

typedef int (*srtp_protect_fn)(void *ctx, void *rtp_hdr, int *len_ptr);

enum { TOTAL_SENT, TOTAL_BYTES, TOTAL_SRTP_FAILED, TOTAL_SEND_FAILED, TOTAL_COUNT };

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

int spaces_fanout(uintptr_t protect_address, int fd, uintptr_t sessions_address,
                  uintptr_t buffers_address, size_t stride, uintptr_t lengths_address,
                  uintptr_t msgs_address, int count, int chunk, const char *packet, int size,
                  double *chunk_done, int *chunk_sent, long *totals)
{
    srtp_protect_fn protect = (srtp_protect_fn)protect_address;
    void *const *sessions = (void *const *)sessions_address;
    char *buffers = (char *)buffers_address;
    int *lengths = (int *)lengths_address;
    struct mmsghdr *msgs = (struct mmsghdr *)msgs_address;
    struct timespec now;
    int chunks = 0;

    for (int k = 0; k < TOTAL_COUNT; k++)
        totals[k] = 0;
    for (int a = 0; a < count; a += chunk) {
        int b = a + chunk < count ? a + chunk : count;
        int run_start = a;
        int sent = 0;
        for (int i = a; i < b; i++) {
            if (i + PREFETCH_AHEAD < count) {
                /* A fan-out visits a thousand cold contexts: fetch the next ones early. */
                const char *next = sessions[i + PREFETCH_AHEAD];
                for (int line = 0; line < SPACES_SRTP_GCM_HOT_BYTES; line += 64)
                    __builtin_prefetch(next + line);
            }
            char *buffer = buffers + (size_t)i * stride;
            memcpy(buffer, packet, (size_t)size);
            lengths[i] = size;
            if (protect(sessions[i], buffer, &lengths[i]) != 0) {
                totals[TOTAL_SRTP_FAILED] += 1;
                send_run(fd, msgs, run_start, i, totals, &sent);
                run_start = i + 1;
                continue;
            }
            msgs[i].msg_hdr.msg_iov[0].iov_len = (size_t)lengths[i];
        }
        send_run(fd, msgs, run_start, b, totals, &sent);
        clock_gettime(CLOCK_MONOTONIC, &now);
        chunk_done[chunks] = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
        chunk_sent[chunks] = sent;
        chunks++;
    }
    return chunks;
}
