/*
 * nbd_fast.c -- the NBD request loop declared in nbd_fast.h.
 *
 * It parses, runs and answers plain READs and WRITEs straight from the
 * connection's input buffer; everything else returns to Python with the
 * request unconsumed.  No Python, no sends; the only allocation is a
 * connection's writer thread for pipelined large WRITEs (struct pipe), made at
 * its first one and kept until ts_nbd_close.
 */
#define _GNU_SOURCE
#include "nbd_fast.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_MAGIC 0x67446698u
#define STRUCTURED_MAGIC 0x668E33EFu
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_FLUSH 3
#define CMD_FLAG_FUA 1
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

/* After a failed recv or send on fd: 1 when it failed only because a
 * non-blocking socket was not ready (EAGAIN), once poll says it is (events:
 * POLLIN or POLLOUT), so the caller tries again; 0 for a real error (errno). */
static int would_block(int fd, short events)
{
    if (errno != EAGAIN && errno != EWOULDBLOCK) return 0;
    struct pollfd p = { fd, events, 0 };
    poll(&p, 1, -1);
    return 1;
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
        if (would_block(c->fd, POLLIN)) continue;        /* a non-blocking socket */
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

/* A WRITE the lane did: its reply, its note, its counts; -1 (served). */
static int noted(ts_nbd_conn *c, uint64_t offset, uint32_t length, int64_t t0);

static int wrote(ts_nbd_conn *c, uint64_t cookie, uint64_t offset, uint32_t length, int64_t t0)
{
    simple_reply(c->obuf + c->out_len, cookie);
    c->out_len += SIMPLE_LEN;
    c->replies += 1;
    return noted(c, offset, length, t0);
}

/* A WRITE served: noted and counted; -1.  With the log's cursor the note goes to
 * its shared notes, where any connection's loop can put it in a record (a FLUSH
 * may come on another connection); else, or when they cannot take it, to
 * c->notes for Python, counted pending in the cursor at once. */
static int noted(ts_nbd_conn *c, uint64_t offset, uint32_t length, int64_t t0)
{
    if (!c->log || !ts_log_note(c->log, c->dev_id, offset, length)) {
        uint64_t k = c->n_notes++;
        c->notes[2 * k] = offset;
        c->notes[2 * k + 1] = length;
        if (c->log)
            ts_log_pending(c->log, 1);
    }
    c->since += 1;
    c->started = 0;
    c->stat[3] += 1;
    c->stat[4] += length;
    c->stat[5] += now_ns() - t0;
    return -1;
}

/* ---- the durable path (nbd_fast.h) ------------------------------------------- */

#define SCORE_MAX 4      /* held.py _SCORE_MAX, _SCORE_MIN */
#define SCORE_MIN (-8)

/* Hold a FLUSH (length 0) or FUA WRITE, scoring the early flush's guess as
 * held.py's _hold does. */
static void hold(ts_nbd_conn *c, uint64_t cookie, uint64_t offset, uint32_t length)
{
    int64_t gap = c->since;
    if (c->guess) {
        c->score = gap == c->guess ? (c->score < SCORE_MAX ? c->score + 1 : SCORE_MAX)
                                   : (c->score - 2 > SCORE_MIN ? c->score - 2 : SCORE_MIN);
        c->guess = 0;
    }
    c->gap = gap;
    c->since = 0;
    c->started = 0;
    uint32_t k = c->n_held++;
    c->held_cookie[k] = cookie;
    c->held_offset[k] = offset;
    c->held_length[k] = length;
}

/* A record of the call's notes appended (ts_log_own); 1 with *ticket, or 0. */
static int own(ts_nbd_conn *c, uint64_t *ticket)
{
    if (!ts_log_own(c->log, c->pool, c->dev, c->dev_id, c->notes, c->n_notes, c->scratch,
                    c->scratch_size, ticket))
        return 0;
    c->n_notes = 0;          /* in the record: not Python's to note */
    return 1;
}

/* Wait for ticket, then answer every held request; 1, or 0 (left held). */
static int answer(ts_nbd_conn *c, uint64_t ticket)
{
    int64_t t0 = now_ns();
    if (ts_syncer_wait(c->log->syncer, ticket) < 0)
        return 0;
    int64_t flushes = 0;
    for (uint32_t k = 0; k < c->n_held; k++) {
        simple_reply(c->obuf + c->out_len, c->held_cookie[k]);
        c->out_len += SIMPLE_LEN;
        flushes += c->held_length[k] == 0;
    }
    c->replies += c->n_held;
    c->n_held = 0;
    c->flush_stat[0] += flushes;
    c->flush_stat[1] += (now_ns() - t0) * flushes;
    return 1;
}

/* Send obuf[mark, out_len) (with may_send only: nobody else sends meanwhile); 0,
 * or -1 with send_failed set.  Then the buffer is empty again. */
static int send_out(ts_nbd_conn *c)
{
    uint64_t at = c->mark;
    while (at < c->out_len) {
        ssize_t n = send(c->fd, c->obuf + at, c->out_len - at, MSG_NOSIGNAL);
        if (n > 0) { at += (uint64_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && would_block(c->fd, POLLOUT)) continue;
        c->send_failed = n < 0 ? errno : EPIPE;
        return -1;
    }
    c->out_len = c->replies = 0;
    c->mark = 0;
    return 0;
}

/* No whole request is buffered: settle what is held, or append the early record. */
static int idle(ts_nbd_conn *c)
{
    uint64_t ticket;
    if (!c->log)
        return TS_NBD_IDLE;
    if (c->n_held) {
        if (!own(c, &ticket))
            return TS_NBD_IDLE;             /* Python takes them over */
        if (c->out_len != c->mark) {        /* the call's replies go out first */
            c->ticket = ticket;
            return TS_NBD_SYNC;
        }
        answer(c, ticket);
        return TS_NBD_IDLE;
    }
    if (c->since && c->since == c->gap && c->writable) {
        if (!c->guess)
            c->guess = c->since;
        if (c->score >= 0 && !c->started && own(c, &ticket)) {
            c->started = 1;
            c->early = ticket;
        }
    }
    return TS_NBD_IDLE;
}

/* The early record's write is on its way and the FLUSH it was started for has not
 * arrived yet (the write's reply just went out, nothing is buffered): wait for the
 * record before waiting for the socket.  The FLUSH cannot be answered sooner anyway,
 * and it then finds the record durable and is answered as soon as it is read, so a
 * QD1 write+FLUSH cycle sleeps twice (request, record) rather than three times
 * (request, FLUSH, record): in a virtual machine each wake-up is a scheduler round
 * trip, often an IPI.  A failed wait is left to the FLUSH, which meets it again. */
static void settle_early(ts_nbd_conn *c)
{
    ts_syncer_wait(c->log->syncer, c->early);
    c->early = 0;
}

/* One WRITE whose header and payload are at h: TS_NBD_OTHER when the lane
 * stands aside, else served: -1, or TS_NBD_FUA (no reply) for a FUA write. */
static int serve_write(ts_nbd_conn *c, const uint8_t *h, uint64_t cookie, uint64_t offset,
                       uint32_t length, int fua)
{
    int64_t t0 = now_ns();
    int64_t rc = ts_write(c->pool, c->dev, h + TS_NBD_HEADER, offset, length, TS_REQ_LANE,
                          NULL, 0);
    if (rc < 0) {
        c->err = rc == TS_SLOW ? 0 : rc;
        return TS_NBD_OTHER;
    }
    c->start += TS_NBD_HEADER + (uint64_t)length;
    if (!fua)
        return wrote(c, cookie, offset, length, t0);
    noted(c, offset, length, t0);      /* no reply: held until a flush */
    if (c->log) {
        hold(c, cookie, offset, length);
        return -1;
    }
    c->fua_cookie = cookie;
    c->fua_offset = offset;
    c->fua_length = length;
    return TS_NBD_FUA;
}

/* ---- the writer thread (pipelined large WRITEs, nbd_fast.h) -------------- */

/* A large WRITE received whole: its payload in big (which 0) or big2 (1). */
struct job {
    uint8_t *buf; int which;
    uint64_t cookie, offset, length;
    int64_t t0;                /* when its payload was in (the request's timing) */
    int64_t rc;                /* ts_write's answer, set by the writer           */
};

/* A connection's writer: it waits on `go`, writes `job` through the lane and
 * signals `done` (eventfds, so the loop can wait for the socket and the write
 * at once).  `busy` and `parked` are the loop's alone. */
struct pipe {
    ts_nbd_conn *c;
    pthread_t thread;
    int go, done;
    int stop;                  /* the writer exits at its next go           */
    int busy;                  /* job is with the writer                    */
    int cur;                   /* the buffer the next payload goes to       */
    struct job job;
    int has_parked;            /* parked: received, not yet given (TAKEN)   */
    struct job parked;
};

/* Add one to eventfd fd (wakes its waiter). */
static void signal_fd(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, 8) < 0 && errno == EINTR) {}
}

/* Wait until eventfd fd is signalled, and reset it. */
static void wait_fd(int fd)
{
    uint64_t v;
    while (read(fd, &v, 8) < 0 && errno == EINTR) {}
}

/* The writer thread: each `go` writes `job` (its answer in job.rc) and signals
 * `done`, until a `go` finds `stop` set. */
static void *writer_main(void *arg)
{
    struct pipe *w = arg;
    for (;;) {
        wait_fd(w->go);
        if (__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE)) return NULL;
        struct job *j = &w->job;
        j->rc = ts_write(w->c->pool, w->c->dev, j->buf, j->offset, j->length, TS_REQ_LANE,
                         NULL, 0);
        signal_fd(w->done);
    }
}

/* c's writer, started at the first call: NULL (and no more tries: big2 is
 * dropped, the loop writes in turn) when no thread or eventfd can be had. */
static struct pipe *pipe_get(ts_nbd_conn *c)
{
    if (c->pipe) return c->pipe;
    struct pipe *w = calloc(1, sizeof *w);
    if (!w) goto fail;
    w->c = c;
    w->go = eventfd(0, EFD_CLOEXEC);
    w->done = eventfd(0, EFD_CLOEXEC);
    if (w->go < 0 || w->done < 0) goto fail;
    /* the writer takes no signals (Python's handlers run on the main thread) and
     * needs little stack (the lane's largest frame is a 64 KiB bounce buffer) */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    int rc = pthread_create(&w->thread, &attr, writer_main, w);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) goto fail;
    c->pipe = w;
    return w;
fail:
    if (w) {
        if (w->go >= 0) close(w->go);
        if (w->done >= 0) close(w->done);
        free(w);
    }
    c->big2 = NULL;
    return NULL;
}

/* Give j to the writer (it must have no job); the next payload goes to the
 * other buffer. */
static void submit(struct pipe *w, const struct job *j)
{
    w->job = *j;
    w->busy = 1;
    w->cur = j->which ^ 1;
    signal_fd(w->go);
}

/* Wait for the writer's job; then its reply, note and counts (-1), or, when
 * the lane did not write it, TS_NBD_TAKEN with taken_* naming it. */
static int finish(ts_nbd_conn *c, struct pipe *w)
{
    wait_fd(w->done);
    w->busy = 0;
    const struct job *j = &w->job;
    if (j->rc >= 0) return wrote(c, j->cookie, j->offset, (uint32_t)j->length, j->t0);
    c->err = j->rc == TS_SLOW ? 0 : j->rc;
    c->taken_cookie = j->cookie;
    c->taken_offset = j->offset;
    c->taken_length = j->length;
    c->taken_which = j->which;
    return TS_NBD_TAKEN;
}

/* Receive the rest of a request header while the writer has a job: 1 once
 * [start, end) holds a header, 0 when the job is done first, -1 at the end of
 * the stream or on an error (c->err).  Only the header's bytes are asked for,
 * so a large payload goes from the socket straight to its buffer. */
static int fill_beside(ts_nbd_conn *c, struct pipe *w)
{
    if (c->start) {
        memmove(c->ibuf, c->ibuf + c->start, c->end - c->start);
        c->end -= c->start;
        c->start = 0;
    }
    while (c->end < TS_NBD_HEADER) {
        ssize_t n = recv(c->fd, c->ibuf + c->end, TS_NBD_HEADER - c->end, MSG_DONTWAIT);
        if (n > 0) { c->end += (uint64_t)n; continue; }
        if (n == 0) return -1;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) { c->err = -errno; return -1; }
        struct pollfd p[2] = { { c->fd, POLLIN, 0 }, { w->done, POLLIN, 0 } };
        if (poll(p, 2, -1) < 0) continue;          /* EINTR */
        if (p[0].revents) continue;                 /* data, or the error recv reports */
        if (p[1].revents) return 0;
    }
    return 1;
}

/* ---- large WRITEs ------------------------------------------------------------ */

/* Receive a large WRITE's payload into buf: what is buffered, then the rest
 * from the socket; 0, or TS_NBD_CLOSED (the payload is lost with the
 * connection). */
static int receive_payload(ts_nbd_conn *c, uint8_t *buf, uint32_t length)
{
    uint64_t have = c->end - c->start - TS_NBD_HEADER;
    if (have > length) have = length;
    memcpy(buf, c->ibuf + c->start + TS_NBD_HEADER, have);
    c->start += TS_NBD_HEADER + have;
    while (have < length) {
        ssize_t n = recv(c->fd, buf + have, length - have, MSG_WAITALL);  /* one wake-up */
        if (n > 0) { have += (uint64_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && would_block(c->fd, POLLIN)) continue;
        c->err = n < 0 ? -errno : 0;
        c->lost = length;
        return TS_NBD_CLOSED;
    }
    return 0;
}

/* A large WRITE: its payload received whole, then the lane -- in turn, or,
 * pipelined, on the writer once the one before is done there; that one's reply
 * is then made and TS_NBD_SEND returned, so it goes out while the writer
 * works.  TS_NBD_TAKEN when the lane does not write one (the new one is then
 * parked, given to the writer at the next call). */
static int serve_large_write(ts_nbd_conn *c, uint64_t cookie, uint64_t offset, uint32_t length)
{
    struct pipe *w = c->big2 ? pipe_get(c) : NULL;
    struct job j = { c->big, 0, cookie, offset, length, 0, 0 };
    if (w && w->cur) { j.buf = c->big2; j.which = 1; }
    int rc = receive_payload(c, j.buf, length);
    if (rc) return rc;
    j.t0 = now_ns();
    if (w) {
        int answered = w->busy;
        rc = answered ? finish(c, w) : -1;
        if (rc == TS_NBD_TAKEN) {
            w->parked = j;
            w->has_parked = 1;
            return rc;
        }
        submit(w, &j);
        return answered ? TS_NBD_SEND : -1;
    }
    int64_t done = ts_write(c->pool, c->dev, j.buf, offset, length, TS_REQ_LANE, NULL, 0);
    if (done < 0) {
        c->err = done == TS_SLOW ? 0 : done;
        c->taken_cookie = cookie;
        c->taken_offset = offset;
        c->taken_length = length;
        c->taken_which = 0;
        return TS_NBD_TAKEN;
    }
    return wrote(c, cookie, offset, length, j.t0);
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
    c->replies += 1;
    c->stat[0] += 1;
    c->stat[1] += length;
    c->stat[2] += now_ns() - t0;
    return -1;
}

/* The loop of ts_nbd_burst; it may return with a job on the writer. */
static int burst(ts_nbd_conn *c, int may_block)
{
    int rounds = 0;
    for (;;) {
        struct pipe *w = c->pipe;
        int busy = w && w->busy;     /* one reply and one note more to come */
        if (c->out_len >= c->out_flush || c->replies + c->n_held + busy >= c->max_replies ||
            c->n_notes + busy >= TS_NBD_NOTES_MAX || c->n_held >= TS_NBD_HELD_MAX)
            return TS_NBD_FULL;
        if (c->end - c->start < TS_NBD_HEADER) {
            if (busy) {
                int got = fill_beside(c, w);
                if (got < 0) return TS_NBD_CLOSED;
                if (got == 0) {
                    int rc = finish(c, w);
                    if (rc >= 0) return rc;
                    continue;
                }
            } else {
                if (!may_block) {
                    int rc = idle(c);
                    if (!c->may_send || c->n_notes || rounds >= TS_NBD_ROUNDS)
                        return rc;
                    if (rc == TS_NBD_SYNC) {    /* the call's replies, then the held */
                        if (send_out(c) < 0) return TS_NBD_CLOSED;
                        if (!answer(c, c->ticket)) return TS_NBD_IDLE;
                        rc = TS_NBD_IDLE;
                    }
                    if (rc != TS_NBD_IDLE || c->n_held) return rc;
                    if (send_out(c) < 0) return TS_NBD_CLOSED;
                    if (c->early && c->end == c->start)
                        settle_early(c);
                    rounds++;
                    may_block = 1;      /* settled, as Python would have */
                    continue;
                }
                if (fill(c, TS_NBD_HEADER) < 0) return TS_NBD_CLOSED;
            }
        }
        const uint8_t *h = c->ibuf + c->start;
        uint16_t flags = get16(h + 4), type = get16(h + 6);
        uint64_t cookie = get64(h + 8), offset = get64(h + 16);
        uint32_t length = get32(h + 24);
        uint64_t size = __atomic_load_n(&c->dev->size, __ATOMIC_RELAXED);
        uint64_t most = c->large_max > TS_NBD_FAST_MAX ? c->large_max : TS_NBD_FAST_MAX;
        if (type == CMD_FLUSH && c->log && c->fua && c->writable && !flags && !offset &&
                !length && get32(h) == REQUEST_MAGIC) {
            if (busy) {                 /* the write before it is noted first */
                int rc = finish(c, w);
                if (rc >= 0) return rc;
                continue;
            }
            c->start += TS_NBD_HEADER;
            hold(c, cookie, 0, 0);
            may_block = 0;
            continue;
        }
        int fua = flags == CMD_FLAG_FUA && type == CMD_WRITE && c->fua &&
                  length <= TS_NBD_FAST_MAX;
        if (get32(h) != REQUEST_MAGIC || (flags && !fua) || type > CMD_WRITE || length == 0 ||
            length > most || offset > size || length > size - offset)
            return TS_NBD_OTHER;
        int large = type == CMD_WRITE && length > TS_NBD_FAST_MAX;
        if (busy && !(large && c->writable && length <= c->big_size)) {
            int rc = finish(c, w);   /* only a large WRITE is received beside a job */
            if (rc >= 0) return rc;
            continue;
        }
        int rc;
        if (type == CMD_WRITE) {
            if (!c->writable) return TS_NBD_OTHER;
            if (c->out_len + (1 + busy) * SIMPLE_LEN > c->out_size) return TS_NBD_FULL;
            if (large) {
                if (!c->big || length > c->big_size) return TS_NBD_OTHER;
                rc = serve_large_write(c, cookie, offset, length);
            } else {
                if (c->end - c->start < TS_NBD_HEADER + (uint64_t)length) {
                    if (fill(c, TS_NBD_HEADER + (uint64_t)length) < 0) return TS_NBD_CLOSED;
                    h = c->ibuf + c->start;
                }
                rc = serve_write(c, h, cookie, offset, length, fua);
            }
        } else {
            uint64_t need = (c->structured ? DATA_HEAD : SIMPLE_LEN) + (uint64_t)length;
            if (need < HOLE_LEN) need = HOLE_LEN;
            if (c->out_len + need > c->out_size) return c->out_len ? TS_NBD_FULL : TS_NBD_OTHER;
            rc = serve_read(c, cookie, offset, length);
        }
        if (rc >= 0) return rc;
        may_block = 0;
    }
}

/* A call's counters and cursors, zeroed at its start. */
static void begin(ts_nbd_conn *c)
{
    memset(c->stat, 0, sizeof c->stat);
    memset(c->flush_stat, 0, sizeof c->flush_stat);
    c->err = 0;
    c->lost = 0;
    c->n_notes = 0;
    c->mark = c->out_len;
    c->send_failed = 0;
    c->early = 0;
}

int ts_nbd_burst(ts_nbd_conn *c, int may_block)
{
    begin(c);
    struct pipe *w = c->pipe;
    if (w && w->has_parked) {          /* received at the last call, after a TAKEN */
        w->has_parked = 0;
        submit(w, &w->parked);
    }
    int rc = burst(c, may_block);
    if (rc != TS_NBD_SEND && (w = c->pipe, w && w->busy)) {   /* else no job is left */
        int64_t err = c->err;
        if (finish(c, w) == TS_NBD_TAKEN) return TS_NBD_TAKEN;
        c->err = err;
    }
    return rc;
}

int ts_nbd_settle(ts_nbd_conn *c)
{
    begin(c);
    return answer(c, c->ticket) ? -1 : TS_NBD_IDLE;
}

int ts_nbd_drain(ts_nbd_conn *c)
{
    begin(c);
    struct pipe *w = c->pipe;
    return w && w->busy ? finish(c, w) : -1;
}

void ts_nbd_close(ts_nbd_conn *c)
{
    struct pipe *w = c->pipe;
    if (!w) return;
    if (w->busy) finish(c, w);         /* not after ts_nbd_burst; kept safe all the same */
    __atomic_store_n(&w->stop, 1, __ATOMIC_RELEASE);
    signal_fd(w->go);
    pthread_join(w->thread, NULL);
    close(w->go);
    close(w->done);
    free(w);
    c->pipe = NULL;
}
