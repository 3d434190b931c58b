/*
 * intentlog.c -- native help for the intent log (thinstore/synclog.py), declared in
 * thinstore_native.h: a record built whole (ts_log_record, with the metadata
 * checksum ts_mmh3) and the log's writer thread (ts_syncer_*), which makes records
 * durable in groups.
 *
 * The log writer.  synclog.py used to append a record with pwrite (page cache) and
 * then fdatasync the log in the thread that needed it durable: the disk's latency
 * (about 80 us here) could not start before that thread was done with everything
 * else, and nothing else in it ran meanwhile.  Now the caller hands the record over
 * (ts_syncer_append: a copy) and goes on -- the NBD reader sends the write's reply
 * and reads the client's FLUSH while the disk works -- and waits only where
 * durability is owed (ts_syncer_wait).  Two ways to the disk:
 *   - Linux AIO (where the log opens O_DIRECT and the kernel gives an AIO context;
 *     see "Linux AIO" below): the append submits the record as one asynchronous
 *     O_DIRECT|O_DSYNC write; a waiter reaps completions.  No thread, no hand-off.
 *   - A writer thread (elsewhere, or with THINSTORE_LOG_THREAD=1, for tests):
 *     the append queues, a kick wakes the thread, which writes everything queued
 *     with O_DIRECT|O_DSYNC, or buffered writes and one fdatasync where the file
 *     refuses direct I/O.
 *
 * Tickets: a ticket is the log's count of bytes appended after a record; it is
 * durable once every record up to it has been written durably.  A waiter needs an
 * attempt that begins after its call (thread: attempt started+1 or later; AIO: a
 * completion reaped after it).  A failed write fails every waiter that needed it
 * and its records stay owed: the next wait retries, as the next FLUSH did when this
 * ran in Python.  Records of an epoch a full commit ended are never written again.
 */
#define _GNU_SOURCE
#include "thinstore_native.h"

#include <errno.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- the checksum ------------------------------------------------------ */

static inline uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

/* MurmurHash3, x86 32-bit variant (Austin Appleby's public-domain algorithm), written
 * from its description: 4-byte little-endian blocks mixed with c1/c2, the 1-3 byte
 * tail, then the length and the final avalanche.  The mmh3 package computes the same
 * (format.checksum); tests/test_synclog_native.py holds the two together. */
uint32_t ts_mmh3(const uint8_t *data, uint64_t len, uint32_t seed)
{
    const uint32_t c1 = 0xcc9e2d51u, c2 = 0x1b873593u;
    uint32_t h = seed;
    uint64_t blocks = len / 4;
    for (uint64_t i = 0; i < blocks; i++) {
        uint32_t k;
        memcpy(&k, data + 4 * i, 4);        /* little-endian hosts only (x86, arm64) */
        k *= c1;
        k = rotl32(k, 15);
        k *= c2;
        h ^= k;
        h = rotl32(h, 13);
        h = h * 5 + 0xe6546b64u;
    }
    const uint8_t *tail = data + 4 * blocks;
    uint32_t k = 0;
    switch (len & 3) {
    case 3: k ^= (uint32_t)tail[2] << 16; /* fall through */
    case 2: k ^= (uint32_t)tail[1] << 8;  /* fall through */
    case 1: k ^= tail[0];
        k *= c1;
        k = rotl32(k, 15);
        k *= c2;
        h ^= k;
    }
    h ^= (uint32_t)len;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* ---- building a record ------------------------------------------------ */

static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }  /* little-endian hosts */
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

#define LOG_HEADER_SIZE 64
#define LOG_ENTRY_SIZE 32
#define LOG_ALIGN 512
#define LOG_DATA 1
#define LOG_ZERO 2

int64_t ts_log_record(const ts_pool *p, const ts_dev *const *devs, const uint64_t *dev_ids,
                      const uint64_t *ranges, uint64_t n, uint8_t *out, uint64_t out_len)
{
    unsigned shift = p->chunk_shift;
    uint64_t head = LOG_HEADER_SIZE + n * LOG_ENTRY_SIZE;
    if (head > out_len)
        return TS_SLOW;
    uint64_t pos = head;
    for (uint64_t k = 0; k < n; k++) {
        const ts_dev *dev = devs[ranges[3 * k]];
        uint64_t off = ranges[3 * k + 1], len = ranges[3 * k + 2];
        if (len == 0 || off + len < off || off + len > dev->size || len > out_len - pos)
            return TS_SLOW;
        uint64_t d0 = (off >> shift) / TS_FANOUT, d1 = ((off + len - 1) >> shift) / TS_FANOUT;
        if (d1 >= dev->n_dir)
            return TS_E_CORRUPT;
        for (uint64_t d = d0; d <= d1; d++) {
            uint64_t pid = dev->dir[d];
            if (pid >= p->n_pages)
                return TS_E_CORRUPT;
            if (pid && !p->page_loaded[pid])
                return TS_SLOW;             /* Python loads it, and builds the record */
        }
        int rc = ts_read_range(dev->dir, dev->n_dir, p->pages, p->n_pages, shift, p->fd,
                               out + pos, off, len);
        if (rc < 0)
            return rc;
        int zero = ts_is_zero(out + pos, len);
        uint8_t *e = out + LOG_HEADER_SIZE + k * LOG_ENTRY_SIZE;
        put64(e, dev_ids[ranges[3 * k]]);
        put64(e + 8, off);
        put64(e + 16, len);
        put32(e + 24, zero ? LOG_ZERO : LOG_DATA);
        put32(e + 28, 0);
        if (!zero)
            pos += len;
    }
    uint64_t total = (pos + LOG_ALIGN - 1) / LOG_ALIGN * LOG_ALIGN;
    if (total > out_len)
        return TS_SLOW;
    memset(out + pos, 0, total - pos);
    put64(out + 16, total);
    put32(out + 12, (uint32_t)n);
    put32(out + 4, ts_mmh3(out + 8, total - 8, 0));
    return (int64_t)total;
}

/* ---- the log writer -------------------------------------------------------- */

/* Records waiting for the thread: bytes in an aligned buffer, as segments of the file
 * (a new epoch starts again at offset 0, so not every append extends the last). */
struct seg { uint64_t file_off, buf_off, len; };
struct pending {
    uint8_t *buf; uint64_t cap, used;
    struct seg *segs; uint64_t n_segs, segs_cap;
    uint64_t ticket;            /* the ticket of the last record appended here */
};

struct ts_syncer {
    pthread_mutex_t mu;
    pthread_cond_t work;        /* the thread: something to write, or stop        */
    pthread_cond_t done_cv;     /* waiters: an attempt finished                   */
    pthread_t thread;
    int fd;                     /* the log, buffered                               */
    int dio_fd;                 /* the log opened O_DIRECT|O_DSYNC, or -1          */
    int stop;
    int joined;                 /* ts_syncer_stop has joined (or is joining)      */
    int busy;                   /* the thread is writing `writing` (no mutex held) */
    struct pending queued;      /* appended, not yet taken by the thread          */
    struct pending writing;     /* taken by the thread (empty between attempts)   */
    uint64_t requested;         /* highest ticket kicked                           */
    uint64_t done;              /* every ticket <= done is durable                 */
    uint64_t started;           /* attempts begun                                  */
    uint64_t failed_attempt;    /* the last attempt that failed (0: none)          */
    int failed_errno;
    uint64_t syncs;             /* attempts that made records durable              */
    uint64_t direct;            /* ... of them by O_DIRECT|O_DSYNC writes alone     */
    /* asynchronous mode (see "Linux AIO" below): no thread */
    int aio;
    aio_context_t ctx;
    struct arec *head, *tail;   /* records in ticket order, not yet counted durable */
    int reaping;                /* a waiter is inside io_getevents                  */
    uint64_t fail_gen;          /* failed writes reaped so far                     */
    uint64_t epoch;             /* discards so far: records of an older epoch are
                                 * never written again                             */
    int dio_refused;            /* a direct write got EINVAL: buffered from now on */
};

#define WRITE_ALIGN 4096

static int pending_reserve(struct pending *q, uint64_t len)
{
    if (q->used + len > q->cap) {
        uint64_t cap = q->cap ? q->cap : (1 << 20);
        while (cap < q->used + len)
            cap *= 2;
        void *nb;
        if (posix_memalign(&nb, WRITE_ALIGN, cap))
            return -ENOMEM;
        if (q->used)
            memcpy(nb, q->buf, q->used);
        free(q->buf);
        q->buf = nb;
        q->cap = cap;
    }
    if (q->n_segs == q->segs_cap) {
        uint64_t n = q->segs_cap ? 2 * q->segs_cap : 16;
        struct seg *ns = realloc(q->segs, n * sizeof *ns);
        if (!ns)
            return -ENOMEM;
        q->segs = ns;
        q->segs_cap = n;
    }
    return 0;
}

/* Add len bytes for file offset off (len a multiple of 512, as records are). */
static int pending_add(struct pending *q, const uint8_t *rec, uint64_t len, uint64_t off)
{
    int rc = pending_reserve(q, len);
    if (rc)
        return rc;
    memcpy(q->buf + q->used, rec, len);
    struct seg *last = q->n_segs ? &q->segs[q->n_segs - 1] : NULL;
    if (last && last->file_off + last->len == off && last->buf_off + last->len == q->used)
        last->len += len;
    else
        q->segs[q->n_segs++] = (struct seg){off, q->used, len};
    q->used += len;
    return 0;
}

static void pending_clear(struct pending *q) { q->used = q->n_segs = 0; }

static void pending_free(struct pending *q)
{
    free(q->buf);
    free(q->segs);
    memset(q, 0, sizeof *q);
}

static int write_all(int fd, const uint8_t *buf, uint64_t len, uint64_t off)
{
    while (len) {
        ssize_t n = pwrite(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        buf += n; len -= (uint64_t)n; off += (uint64_t)n;
    }
    return 0;
}

/* Write what the thread took and make it durable: O_DIRECT|O_DSYNC writes where the
 * file takes them (each returns once its bytes are on stable storage), else buffered
 * writes and one fdatasync.  Called without the mutex. */
static int write_durably(ts_syncer *s, int *direct)
{
    struct pending *w = &s->writing;
    *direct = 0;
    if (s->dio_fd >= 0) {
        int rc = 0;
        uint64_t k;
        for (k = 0; k < w->n_segs && rc == 0; k++)
            rc = write_all(s->dio_fd, w->buf + w->segs[k].buf_off, w->segs[k].len,
                           w->segs[k].file_off);
        if (rc == 0) {
            *direct = 1;
            return 0;
        }
        if (rc != -EINVAL)
            return rc;
        s->dio_fd = -1;     /* alignment refused here (a 4 KiB-sector disk): buffered from now */
    }
    for (uint64_t k = 0; k < w->n_segs; k++) {
        int rc = write_all(s->fd, w->buf + w->segs[k].buf_off, w->segs[k].len,
                           w->segs[k].file_off);
        if (rc)
            return rc;
    }
    return fdatasync(s->fd) ? -errno : 0;
}

/* The attempt failed: its records go back in front of those queued since. */
static int requeue(ts_syncer *s)
{
    struct pending *w = &s->writing, *q = &s->queued, merged = {0};
    int rc = 0;
    for (uint64_t k = 0; k < w->n_segs && !rc; k++)
        rc = pending_add(&merged, w->buf + w->segs[k].buf_off, w->segs[k].len,
                         w->segs[k].file_off);
    for (uint64_t k = 0; k < q->n_segs && !rc; k++)
        rc = pending_add(&merged, q->buf + q->segs[k].buf_off, q->segs[k].len,
                         q->segs[k].file_off);
    if (rc) {
        pending_free(&merged);
        return rc;
    }
    merged.ticket = q->n_segs ? q->ticket : w->ticket;
    pending_free(q);
    *q = merged;
    pending_clear(w);
    return 0;
}

static void *syncer_main(void *arg)
{
    ts_syncer *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->stop && s->requested <= s->done)
            pthread_cond_wait(&s->work, &s->mu);
        if (s->stop)
            break;
        /* take everything appended: every kicked ticket's record is among it */
        struct pending t = s->writing;
        s->writing = s->queued;
        s->queued = t;
        pending_clear(&s->queued);
        uint64_t target = s->writing.ticket > s->done ? s->writing.ticket : s->done;
        uint64_t attempt = ++s->started;
        s->busy = 1;
        pthread_mutex_unlock(&s->mu);
        int direct;
        int rc = write_durably(s, &direct);
        pthread_mutex_lock(&s->mu);
        s->busy = 0;
        if (rc == 0) {
            pending_clear(&s->writing);
            if (target > s->done)
                s->done = target;
            s->syncs++;
            s->direct += direct;
        } else {
            s->failed_attempt = attempt;
            s->failed_errno = -rc;
            if (requeue(s))             /* no memory to keep them: fail what waits */
                s->failed_errno = ENOMEM;
            /* the tickets it covered stay owed: a later kick retries */
            s->requested = s->done;
        }
        pthread_cond_broadcast(&s->done_cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- Linux AIO ---------------------------------------------------------------
 *
 * Where the log takes O_DIRECT and the kernel gives an AIO context, there is no
 * thread: ts_syncer_append submits the record at once as one asynchronous
 * O_DIRECT|O_DSYNC write (io_submit), and ts_syncer_wait reaps completions
 * (io_getevents) until every record up to its ticket is written.  The submitting
 * thread goes on at once (the NBD reader sends its replies while the disk works)
 * and no thread hand-off sits between the disk and the reply.  Records complete in
 * any order; a ticket counts durable only when every record up to it has completed
 * (replay stops at the first record missing).  A write the kernel does not take
 * asynchronously is made synchronously there and then.
 */
enum { AREC_INFLIGHT, AREC_DONE, AREC_FAILED };
struct arec {
    struct iocb cb;
    uint8_t *buf;
    uint64_t len, off, ticket, epoch;
    int state, err;
    int direct;                 /* written by a direct write (for the stats) */
    struct arec *next;
};

static long sys_io_setup(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static long sys_io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
static long sys_io_submit(aio_context_t ctx, long nr, struct iocb **cbs)
{
    return syscall(SYS_io_submit, ctx, nr, cbs);
}
static long sys_io_getevents(aio_context_t ctx, long min_nr, long nr, struct io_event *ev)
{
    return syscall(SYS_io_getevents, ctx, min_nr, nr, ev, NULL);
}

/* Under the mutex: write r here and now, buffered, then fdatasync -- where direct
 * I/O is refused (a disk with 4 KiB logical sectors takes no 512-byte-aligned direct
 * write, and may say so only in the completion: EINVAL). From then on every record
 * goes this way (dio_refused). */
static void arec_write_sync(ts_syncer *s, struct arec *r)
{
    int rc = write_all(s->fd, r->buf, r->len, r->off);
    if (rc == 0 && fdatasync(s->fd))
        rc = -errno;
    r->state = rc ? AREC_FAILED : AREC_DONE;
    r->err = -rc;
    if (rc) {
        s->fail_gen++;
        s->failed_errno = -rc;
    }
}

/* Under the mutex: send r to the disk; when the kernel will not take it
 * asynchronously, write it here, synchronously. */
static void arec_submit(ts_syncer *s, struct arec *r)
{
    if (s->dio_refused) {
        arec_write_sync(s, r);
        return;
    }
    memset(&r->cb, 0, sizeof r->cb);
    r->cb.aio_data = (uint64_t)(uintptr_t)r;
    r->cb.aio_lio_opcode = IOCB_CMD_PWRITE;
    r->cb.aio_fildes = (uint32_t)s->dio_fd;
    r->cb.aio_buf = (uint64_t)(uintptr_t)r->buf;
    r->cb.aio_nbytes = r->len;
    r->cb.aio_offset = (int64_t)r->off;
    r->state = AREC_INFLIGHT;
    struct iocb *cbs[1] = {&r->cb};
    if (sys_io_submit(s->ctx, 1, cbs) == 1)
        return;
    int rc = write_all(s->dio_fd, r->buf, r->len, r->off);
    if (rc == -EINVAL) {        /* direct I/O refused after all: buffered, then a sync */
        s->dio_refused = 1;
        arec_write_sync(s, r);
        return;
    }
    r->state = rc ? AREC_FAILED : AREC_DONE;
    r->direct = rc == 0;
    r->err = -rc;
    if (rc) {
        s->fail_gen++;
        s->failed_errno = -rc;
    }
}

/* Under the mutex: count the completed records at the head durable. */
static void arec_advance(ts_syncer *s)
{
    struct arec *r;
    while ((r = s->head) && (r->state == AREC_DONE ||
                             (r->state == AREC_FAILED && r->epoch != s->epoch))) {
        if (r->state == AREC_DONE) {
            if (r->ticket > s->done)
                s->done = r->ticket;
            s->syncs++;
            s->direct += (uint64_t)r->direct;
        }
        s->head = r->next;
        if (!s->head)
            s->tail = NULL;
        free(r->buf);
        free(r);
    }
}

/* Reap completions (the mutex held on entry and on return; dropped inside). */
static void arec_reap(ts_syncer *s)
{
    struct io_event ev[64];
    s->reaping = 1;
    pthread_mutex_unlock(&s->mu);
    long n = sys_io_getevents(s->ctx, 1, 64, ev);
    pthread_mutex_lock(&s->mu);
    s->reaping = 0;
    for (long k = 0; k < n; k++) {
        struct arec *r = (struct arec *)(uintptr_t)ev[k].data;
        if (ev[k].res == (int64_t)r->len) {
            r->state = AREC_DONE;
            r->direct = 1;
        } else if (ev[k].res == -EINVAL) {     /* alignment refused at completion */
            s->dio_refused = 1;
            arec_write_sync(s, r);
        } else {
            r->state = AREC_FAILED;
            r->err = ev[k].res < 0 ? (int)-ev[k].res : EIO;
            s->fail_gen++;
            s->failed_errno = r->err;
        }
    }
    arec_advance(s);
    pthread_cond_broadcast(&s->done_cv);
}

/* Under the mutex: wait until nothing is in flight (records of a discarded epoch may
 * not land on the new epoch's). */
static void arec_drain(ts_syncer *s)
{
    while (s->head) {
        if (s->reaping) {
            pthread_cond_wait(&s->done_cv, &s->mu);
            continue;
        }
        int inflight = 0;
        for (struct arec *r = s->head; r; r = r->next)
            inflight |= r->state == AREC_INFLIGHT;
        if (!inflight) {        /* failed ones only: the commit (or close) has them */
            while (s->head) {
                struct arec *r = s->head;
                s->head = r->next;
                free(r->buf);
                free(r);
            }
            s->tail = NULL;
            break;
        }
        arec_reap(s);
    }
}

static int aio_append(ts_syncer *s, const uint8_t *rec, uint64_t len, uint64_t off,
                      uint64_t ticket)
{
    struct arec *r = calloc(1, sizeof *r);
    if (!r)
        return -ENOMEM;
    if (posix_memalign((void **)&r->buf, WRITE_ALIGN, len ? len : 512)) {
        free(r);
        return -ENOMEM;
    }
    memcpy(r->buf, rec, len);
    r->len = len;
    r->off = off;
    r->ticket = ticket;
    pthread_mutex_lock(&s->mu);
    if (s->stop) {
        pthread_mutex_unlock(&s->mu);
        free(r->buf);
        free(r);
        return -EBADF;
    }
    r->epoch = s->epoch;
    if (s->tail)
        s->tail->next = r;
    else
        s->head = r;
    s->tail = r;
    arec_submit(s, r);
    arec_advance(s);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

static int64_t aio_wait(ts_syncer *s, uint64_t ticket)
{
    pthread_mutex_lock(&s->mu);
    uint64_t gen = s->fail_gen;
    int64_t result;
    for (;;) {
        if (ticket <= s->done) {
            result = (int64_t)s->done;
            break;
        }
        if (s->fail_gen > gen) {
            result = -(int64_t)s->failed_errno;
            break;
        }
        if (s->stop) {
            result = -EBADF;
            break;
        }
        if (!s->head) {         /* a ticket never appended */
            result = -EINVAL;
            break;
        }
        if (s->head->state == AREC_FAILED) {    /* an earlier failure: try it again */
            arec_submit(s, s->head);
            arec_advance(s);
            if (s->fail_gen > gen) {
                result = -(int64_t)s->failed_errno;
                break;
            }
            continue;
        }
        if (s->reaping) {
            pthread_cond_wait(&s->done_cv, &s->mu);
            continue;
        }
        arec_reap(s);
    }
    pthread_mutex_unlock(&s->mu);
    return result;
}

ts_syncer *ts_syncer_new(int fd, int dio_fd)
{
    ts_syncer *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->fd = fd;
    s->dio_fd = dio_fd;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->work, NULL);
    pthread_cond_init(&s->done_cv, NULL);
    const char *force = getenv("THINSTORE_LOG_THREAD");
    if (dio_fd >= 0 && !(force && strcmp(force, "1") == 0) &&
            sys_io_setup(256, &s->ctx) == 0) {
        s->aio = 1;
        s->joined = 1;          /* no thread to join */
        return s;
    }
    int rc = pthread_create(&s->thread, NULL, syncer_main, s);
    if (rc) {
        pthread_cond_destroy(&s->done_cv);
        pthread_cond_destroy(&s->work);
        pthread_mutex_destroy(&s->mu);
        free(s);
        errno = rc;
        return NULL;
    }
    return s;
}

int ts_syncer_append(ts_syncer *s, const uint8_t *rec, uint64_t len, uint64_t off,
                     uint64_t ticket)
{
    if (len % 512 || off % 512)
        return TS_E_ARG;
    if (s->aio)
        return aio_append(s, rec, len, off, ticket);
    pthread_mutex_lock(&s->mu);
    int rc = s->stop ? -EBADF : pending_add(&s->queued, rec, len, off);
    if (rc == 0)
        s->queued.ticket = ticket;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void ts_syncer_discard(ts_syncer *s, uint64_t ticket)
{
    pthread_mutex_lock(&s->mu);
    if (s->aio) {
        arec_drain(s);
        s->epoch++;
    }
    /* the thread's attempt ends (a failed one requeues its records, cleared below):
     * once this returns no record write is under way, so the caller may truncate */
    while (s->busy)
        pthread_cond_wait(&s->done_cv, &s->mu);
    pending_clear(&s->queued);
    if (ticket > s->done)
        s->done = ticket;
    if (s->requested < s->done)
        s->requested = s->done;
    pthread_cond_broadcast(&s->done_cv);
    pthread_mutex_unlock(&s->mu);
}

void ts_syncer_kick(ts_syncer *s, uint64_t ticket)
{
    if (s->aio)
        return;                 /* appended records are on their way already */
    pthread_mutex_lock(&s->mu);
    if (ticket > s->done && ticket > s->requested) {
        s->requested = ticket;
        pthread_cond_signal(&s->work);
    }
    pthread_mutex_unlock(&s->mu);
}

int64_t ts_syncer_wait(ts_syncer *s, uint64_t ticket)
{
    if (s->aio)
        return aio_wait(s, ticket);
    pthread_mutex_lock(&s->mu);
    /* the first attempt that begins from now on takes ticket's record (appended
     * before this call); one already running may not hold it */
    uint64_t need = s->started + 1;
    int64_t result;
    for (;;) {
        if (ticket <= s->done) {
            result = (int64_t)s->done;
            break;
        }
        if (s->failed_attempt >= need) {
            result = -(int64_t)s->failed_errno;
            break;
        }
        if (s->stop) {
            result = -EBADF;
            break;
        }
        if (s->requested < ticket) {
            s->requested = ticket;
            pthread_cond_signal(&s->work);
        }
        pthread_cond_wait(&s->done_cv, &s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return result;
}

void ts_syncer_stats(ts_syncer *s, uint64_t *out)
{
    pthread_mutex_lock(&s->mu);
    out[0] = s->done;
    out[1] = s->syncs;
    out[2] = s->started;
    out[3] = s->direct;
    pthread_mutex_unlock(&s->mu);
}

void ts_syncer_stop(ts_syncer *s)
{
    pthread_mutex_lock(&s->mu);
    int joined = s->joined;
    int first = !s->stop;
    if (s->aio && first)
        arec_drain(s);          /* the disk is done with every buffer before close */
    s->stop = 1;
    s->joined = 1;
    pthread_cond_broadcast(&s->work);
    pthread_cond_broadcast(&s->done_cv);
    pthread_mutex_unlock(&s->mu);
    if (!joined)
        pthread_join(s->thread, NULL);
}

void ts_syncer_free(ts_syncer *s)
{
    if (!s)
        return;
    ts_syncer_stop(s);
    if (s->aio)
        sys_io_destroy(s->ctx);
    pending_free(&s->queued);
    pending_free(&s->writing);
    pthread_cond_destroy(&s->done_cv);
    pthread_cond_destroy(&s->work);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* ---- the append cursor (ts_log: the native NBD loop's records) ---------------- */

ts_log *ts_log_new(ts_syncer *s)
{
    ts_log *l = calloc(1, sizeof *l);
    pthread_mutex_t *mu = malloc(sizeof *mu);
    if (!l || !mu) {
        free(l);
        free(mu);
        return NULL;
    }
    pthread_mutex_init(mu, NULL);
    l->mu = mu;
    l->syncer = s;
    return l;
}

void ts_log_free(ts_log *l)
{
    if (!l)
        return;
    pthread_mutex_destroy(l->mu);
    free(l->mu);
    free(l);
}

void ts_log_lock(ts_log *l) { pthread_mutex_lock(l->mu); }
void ts_log_unlock(ts_log *l) { pthread_mutex_unlock(l->mu); }

void ts_log_pending(ts_log *l, int64_t delta)
{
    __atomic_add_fetch(&l->pending, delta, __ATOMIC_SEQ_CST);
}

#define OWN_MAX 64      /* notes one call of ts_log_own takes (nbd_fast.h TS_NBD_NOTES_MAX) */

/* notes[2n] sorted by offset and joined where they overlap or touch, as
 * synclog._merge does, into ranges[3m] (device index 0); returns m. */
static uint64_t own_ranges(const uint64_t *notes, uint64_t n, uint64_t *ranges)
{
    uint64_t off[OWN_MAX], len[OWN_MAX];
    for (uint64_t i = 0; i < n; i++) {            /* insertion sort: n <= 64 */
        uint64_t o = notes[2 * i], ln = notes[2 * i + 1], j = i;
        while (j && off[j - 1] > o) {
            off[j] = off[j - 1];
            len[j] = len[j - 1];
            j--;
        }
        off[j] = o;
        len[j] = ln;
    }
    uint64_t m = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (m && off[i] <= ranges[3 * (m - 1) + 1] + ranges[3 * (m - 1) + 2]) {
            uint64_t start = ranges[3 * (m - 1) + 1], end = off[i] + len[i];
            if (end > start + ranges[3 * (m - 1) + 2])
                ranges[3 * (m - 1) + 2] = end - start;
            continue;
        }
        ranges[3 * m] = 0;
        ranges[3 * m + 1] = off[i];
        ranges[3 * m + 2] = len[i];
        m++;
    }
    return m;
}

/* Under the gate and mu: the record of notes[2n] appended; 1 with *ticket, or 0. */
static int own_append(ts_log *l, ts_pool *p, const ts_dev *dev, uint64_t dev_id,
                      const uint64_t *notes, uint64_t n, uint8_t *scratch,
                      uint64_t scratch_len, uint64_t *ticket)
{
    if (__atomic_load_n(&l->pending, __ATOMIC_SEQ_CST) != (int64_t)n || !l->room)
        return 0;
    uint64_t ranges[3 * OWN_MAX], data = 0;
    uint64_t m = own_ranges(notes, n, ranges);
    for (uint64_t k = 0; k < m; k++)
        data += ranges[3 * k + 2];
    uint64_t head = LOG_HEADER_SIZE + m * LOG_ENTRY_SIZE;
    uint64_t most = (head + data + LOG_ALIGN - 1) / LOG_ALIGN * LOG_ALIGN;
    if (data > l->max_batch || most > scratch_len || l->tail + most > l->room)
        return 0;
    memcpy(scratch, l->head, LOG_HEADER_SIZE);
    put64(scratch + 24, l->sequence);
    const ts_dev *devs[1] = { dev };
    int64_t total = ts_log_record(p, devs, &dev_id, ranges, m, scratch, scratch_len);
    if (total <= 0)
        return 0;
    uint64_t end = l->appended + (uint64_t)total;
    if (ts_syncer_append(l->syncer, scratch, (uint64_t)total, l->tail, end) != 0)
        return 0;
    l->tail += (uint64_t)total;
    l->sequence += 1;
    __atomic_store_n(&l->appended, end, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&l->pending, (int64_t)n, __ATOMIC_SEQ_CST);   /* after appended */
    l->records += 1;
    l->record_bytes += (uint64_t)total;
    *ticket = end;
    return 1;
}

int ts_log_own(ts_log *l, ts_pool *p, const ts_dev *dev, uint64_t dev_id,
               const uint64_t *notes, uint64_t n, uint8_t *scratch, uint64_t scratch_len,
               uint64_t *ticket)
{
    if (n > OWN_MAX || !__atomic_load_n(&l->syncer, __ATOMIC_SEQ_CST))
        return 0;               /* no log writer yet: Python's first append starts it */
    if (n == 0) {
        /* nothing to append: every write noted so far is in a record up to `appended`
         * when none is pending (read before `appended`, which grows first) */
        if (__atomic_load_n(&l->pending, __ATOMIC_SEQ_CST) != 0)
            return 0;
        *ticket = __atomic_load_n(&l->appended, __ATOMIC_SEQ_CST);
        return 1;
    }
    if (!ts_gate_enter_reader(p))
        return 0;
    pthread_mutex_lock(l->mu);
    int ok = own_append(l, p, dev, dev_id, notes, n, scratch, scratch_len, ticket);
    pthread_mutex_unlock(l->mu);
    ts_gate_leave_reader(p);
    if (ok)
        ts_syncer_kick(l->syncer, *ticket);
    return ok;
}
