/*
 * nbd_fast.c -- the NBD request loop declared in nbd_fast.h.
 *
 * It parses, runs and answers plain READs and WRITEs straight from the
 * connection's input buffer; everything else returns to Python with the
 * request unconsumed.  No allocation, no Python, no sends.
 */
#define _GNU_SOURCE
#include "nbd_fast.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_MAGIC 0x67446698u
#define STRUCTURED_MAGIC 0x668E33EFu
#define CMD_READ 0
#define CMD_WRITE 1
#define FLAG_DONE 1
#define TYPE_OFFSET_DATA 1
#define TYPE_OFFSET_HOLE 2
#define SIMPLE_LEN 16
#define DATA_HEAD 28
#define HOLE_LEN 32

static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return __builtin_bswap16(v); }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return __builtin_bswap32(v); }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return __builtin_bswap64(v); }
static inline void put16(uint8_t *p, uint16_t v) { v = __builtin_bswap16(v); memcpy(p, &v, 2); }
static inline void put32(uint8_t *p, uint32_t v) { v = __builtin_bswap32(v); memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { v = __builtin_bswap64(v); memcpy(p, &v, 8); }

static inline int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Receive until [start, end) holds `need` bytes, blocking: 1, or -1 at the end
 * of the stream or on an error (c->err).  Like channel.Inbox._fill, what is
 * held moves to the front of the buffer first. */
static int fill(ts_nbd_conn *c, uint64_t need)
{
    if (need > c->in_size) return -1;
    while (c->end - c->start < need) {
        if (c->start) {
            memmove(c->ibuf, c->ibuf + c->start, c->end - c->start);
            c->end -= c->start;
            c->start = 0;
        }
        ssize_t n = recv(c->fd, c->ibuf + c->end, c->in_size - c->end, 0);
        if (n > 0) { c->end += (uint64_t)n; continue; }
        if (n == 0) return -1;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {    /* a non-blocking socket */
            struct pollfd p = { c->fd, POLLIN, 0 };
            poll(&p, 1, -1);
            continue;
        }
        c->err = -errno;
        return -1;
    }
    return 1;
}

static void simple_reply(uint8_t *o, uint64_t cookie)
{
    put32(o, SIMPLE_MAGIC);
    put32(o + 4, 0);
    put64(o + 8, cookie);
}

static void chunk_head(uint8_t *o, uint16_t type, uint64_t cookie, uint32_t length,
                       uint64_t offset)
{
    put32(o, STRUCTURED_MAGIC);
    put16(o + 4, FLAG_DONE);
    put16(o + 6, type);
    put64(o + 8, cookie);
    put32(o + 16, length);
    put64(o + 20, offset);
}

static int wrote(ts_nbd_conn *c, uint64_t cookie, uint64_t offset, uint32_t length, int64_t t0);

/* One WRITE whose header and payload are at h: TS_NBD_OTHER when the lane
 * stands aside, else served (-1). */
static int serve_write(ts_nbd_conn *c, const uint8_t *h, uint64_t cookie, uint64_t offset,
                       uint32_t length)
{
    int64_t t0 = now_ns();
    int64_t rc = ts_write(c->pool, c->dev, h + TS_NBD_HEADER, offset, length, TS_REQ_LANE,
                          NULL, 0);
    if (rc < 0) {
        c->err = rc == TS_SLOW ? 0 : rc;
        return TS_NBD_OTHER;
    }
    c->start += TS_NBD_HEADER + (uint64_t)length;
    return wrote(c, cookie, offset, length, t0);
}

/* A WRITE the lane did: its reply, its note, its counts; -1 (served). */
static int wrote(ts_nbd_conn *c, uint64_t cookie, uint64_t offset, uint32_t length, int64_t t0)
{
    simple_reply(c->obuf + c->out_len, cookie);
    c->out_len += SIMPLE_LEN;
    uint64_t k = (uint64_t)c->stat[3];
    c->notes[2 * k] = offset;
    c->notes[2 * k + 1] = length;
    c->stat[3] += 1;
    c->stat[4] += length;
    c->stat[5] += now_ns() - t0;
    return -1;
}

/* A large WRITE: its payload into big (what is buffered, then the rest from the
 * socket), then the lane; TS_NBD_TAKEN when the lane does not write it. */
static int serve_large_write(ts_nbd_conn *c, uint64_t cookie, uint64_t offset, uint32_t length)
{
    uint64_t have = c->end - c->start - TS_NBD_HEADER;
    if (have > length) have = length;
    memcpy(c->big, c->ibuf + c->start + TS_NBD_HEADER, have);
    c->start += TS_NBD_HEADER + have;
    while (have < length) {
        ssize_t n = recv(c->fd, c->big + have, length - have, MSG_WAITALL);  /* one wake-up */
        if (n > 0) { have += (uint64_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p = { c->fd, POLLIN, 0 };
            poll(&p, 1, -1);
            continue;
        }
        c->err = n < 0 ? -errno : 0;
        return TS_NBD_CLOSED;          /* the payload is lost with the connection */
    }
    int64_t t0 = now_ns();
    int64_t rc = ts_write(c->pool, c->dev, c->big, offset, length, TS_REQ_LANE, NULL, 0);
    if (rc < 0) {
        c->err = rc == TS_SLOW ? 0 : rc;
        c->taken_cookie = cookie;
        c->taken_offset = offset;
        c->taken_length = length;
        return TS_NBD_TAKEN;
    }
    return wrote(c, cookie, offset, length, t0);
}

/* One READ (its header consumed only when served) into out. */
static int serve_read(ts_nbd_conn *c, uint64_t cookie, uint64_t offset, uint32_t length)
{
    int64_t t0 = now_ns();
    uint64_t head = c->structured ? DATA_HEAD : SIMPLE_LEN;
    uint8_t *o = c->obuf + c->out_len;
    int large = length > TS_NBD_FAST_MAX && c->structured;
    int64_t rc = large ? ts_read_runs(c->pool, c->dev, o + head, offset, length)
                       : ts_read(c->pool, c->dev, o + head, offset, length, TS_REQ_LANE);
    if (rc < 0 || rc == TS_RUNS_MIXED) {
        c->err = rc == TS_SLOW || rc == TS_RUNS_MIXED ? 0 : rc;
        return TS_NBD_OTHER;
    }
    c->start += TS_NBD_HEADER;
    if (!c->structured) {
        simple_reply(o, cookie);
        c->out_len += SIMPLE_LEN + length;
    } else if (large ? rc == TS_RUNS_HOLE : ts_is_zero(o + head, length)) {
        /* OFFSET_HOLE: reads as zeros (small), or no chunk mapped (large) */
        chunk_head(o, TYPE_OFFSET_HOLE, cookie, 12, offset);
        put32(o + 28, length);
        c->out_len += HOLE_LEN;
    } else {
        chunk_head(o, TYPE_OFFSET_DATA, cookie, 8 + length, offset);
        c->out_len += DATA_HEAD + length;
    }
    c->stat[0] += 1;
    c->stat[1] += length;
    c->stat[2] += now_ns() - t0;
    return -1;
}

int ts_nbd_burst(ts_nbd_conn *c, int may_block)
{
    memset(c->stat, 0, sizeof c->stat);
    c->err = 0;
    for (;;) {
        if (c->out_len >= c->out_flush || c->replies >= c->max_replies ||
            c->stat[3] >= TS_NBD_NOTES_MAX)
            return TS_NBD_FULL;
        if (c->end - c->start < TS_NBD_HEADER) {
            if (!may_block) return TS_NBD_IDLE;
            if (fill(c, TS_NBD_HEADER) < 0) return TS_NBD_CLOSED;
        }
        const uint8_t *h = c->ibuf + c->start;
        uint16_t flags = get16(h + 4), type = get16(h + 6);
        uint64_t cookie = get64(h + 8), offset = get64(h + 16);
        uint32_t length = get32(h + 24);
        uint64_t size = __atomic_load_n(&c->dev->size, __ATOMIC_RELAXED);
        uint64_t most = c->large_max > TS_NBD_FAST_MAX ? c->large_max : TS_NBD_FAST_MAX;
        if (get32(h) != REQUEST_MAGIC || flags || type > CMD_WRITE || length == 0 ||
            length > most || offset > size || length > size - offset)
            return TS_NBD_OTHER;
        int rc;
        if (type == CMD_WRITE) {
            if (!c->writable) return TS_NBD_OTHER;
            if (c->out_len + SIMPLE_LEN > c->out_size) return TS_NBD_FULL;
            if (length > TS_NBD_FAST_MAX) {
                if (!c->big || length > c->big_size) return TS_NBD_OTHER;
                rc = serve_large_write(c, cookie, offset, length);
            } else {
                if (c->end - c->start < TS_NBD_HEADER + (uint64_t)length) {
                    if (fill(c, TS_NBD_HEADER + (uint64_t)length) < 0) return TS_NBD_CLOSED;
                    h = c->ibuf + c->start;
                }
                rc = serve_write(c, h, cookie, offset, length);
            }
        } else {
            uint64_t need = (c->structured ? DATA_HEAD : SIMPLE_LEN) + (uint64_t)length;
            if (need < HOLE_LEN) need = HOLE_LEN;
            if (c->out_len + need > c->out_size) return c->out_len ? TS_NBD_FULL : TS_NBD_OTHER;
            rc = serve_read(c, cookie, offset, length);
        }
        if (rc >= 0) return rc;
        c->replies += 1;
        may_block = 0;
    }
}
