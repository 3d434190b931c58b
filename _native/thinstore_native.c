/*
 * thinstore_native.c -- the kernels declared in thinstore_native.h.
 *
 * Plain C over (pointer, length) pairs: no Python.h, no allocation on the hot
 * path, every id bounds-checked.  Semantics are those of the Python twins in
 * thinstore/kernels.py; when the two disagree the twin is right and this file
 * is the bug.
 */
#define _GNU_SOURCE
#include "thinstore_native.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

#define BOUNCE_SIZE (64 * 1024)  /* on the stack: fits any thread's stack */
#define CLONE_ALIGN 4096         /* the file-system block a reflink shares */

static const uint8_t zero_block[64 * 1024];

int ts_api_version(void) { return TS_API_VERSION; }

/* ---- map lookups ------------------------------------------------------- */

/* Entry of virtual chunk v: 0 for a hole, or TS_E_CORRUPT via *err. */
static inline uint64_t lookup(const uint64_t *dir, uint64_t n_dir, const uint64_t *pages,
                              uint64_t n_pages, uint64_t v, int *err)
{
    uint64_t d = v / TS_FANOUT;
    if (d >= n_dir) { *err = TS_E_CORRUPT; return 0; }
    uint64_t pid = dir[d];
    if (pid == 0) return 0;
    if (pid >= n_pages) { *err = TS_E_CORRUPT; return 0; }
    return pages[pid * TS_FANOUT + v % TS_FANOUT];
}

/* Pointer to the entry of virtual chunk v for writing; its page id in *pid.
 * NULL when the page is missing or an id is out of range. */
static inline uint64_t *entry_ptr(uint64_t *dir, uint64_t n_dir, uint64_t *pages,
                                  uint64_t n_pages, uint64_t v, uint64_t *pid)
{
    uint64_t d = v / TS_FANOUT;
    if (d >= n_dir) return NULL;
    *pid = dir[d];
    if (*pid == 0 || *pid >= n_pages) return NULL;
    return &pages[*pid * TS_FANOUT + v % TS_FANOUT];
}

/* Set flags on chunk c, and its window's summary byte (the only way flags are set). */
static inline void mark(uint8_t *state, uint8_t *summary, uint64_t c, uint8_t flags)
{
    state[c] |= flags;
    summary[c >> TS_SUMMARY_SHIFT] = 1;
}

/* One reference less on chunk c, with the ref_batch(-1) flag rules. */
static inline int ref_dec(uint32_t *ref, uint8_t *state, uint8_t *summary, uint64_t c)
{
    if (ref[c] == 0) return TS_E_UNDERFLOW;
    ref[c] -= 1;
    mark(state, summary, c, TS_ST_REF_CHANGED | (ref[c] == 0 ? TS_ST_PENDING_FREE : TS_ST_PINNED));
    return 0;
}

/* ---- positional I/O ---------------------------------------------------- */

static int pread_full(int fd, uint8_t *buf, uint64_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pread(fd, buf, len > (1u << 30) ? (1u << 30) : len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) {  /* past the end of the file: zeros, like FileIO.pread */
            memset(buf, 0, len);
            return 0;
        }
        buf += n; off += (uint64_t)n; len -= (uint64_t)n;
    }
    return 0;
}

static int pwrite_full(int fd, const uint8_t *buf, uint64_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len > (1u << 30) ? (1u << 30) : len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        buf += n; off += (uint64_t)n; len -= (uint64_t)n;
    }
    return 0;
}

/* Make [off, off+len) read as zeros: punch a hole, or write zeros (iovec of a
 * shared zero block) where the file system cannot punch. */
static int punch(int fd, uint64_t off, uint64_t len)
{
    if (len == 0) return 0;
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL)
        return -errno;
    struct iovec iov[16];
    while (len > 0) {
        int k = 0;
        uint64_t batch = 0;
        while (k < 16 && batch < len) {
            uint64_t n = len - batch < sizeof zero_block ? len - batch : sizeof zero_block;
            iov[k].iov_base = (void *)zero_block;
            iov[k].iov_len = n;
            batch += n; k++;
        }
        ssize_t w = pwritev(fd, iov, k, (off_t)off);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        off += (uint64_t)w; len -= (uint64_t)w;
    }
    return 0;
}

static int copy_bounce(int fd, uint64_t src, uint64_t dst, uint64_t len)
{
    uint8_t bounce[BOUNCE_SIZE];
    while (len > 0) {
        uint64_t n = len < BOUNCE_SIZE ? len : BOUNCE_SIZE;
        int rc = pread_full(fd, bounce, n, src);
        if (rc == 0) rc = pwrite_full(fd, bounce, n, dst);
        if (rc) return rc;
        src += n; dst += n; len -= n;
    }
    return 0;
}

/* Share [src, src+len) as [dst, dst+len) (FICLONERANGE: a reflink); 0, or -errno
 * when the file system cannot (ext4, tmpfs: EOPNOTSUPP; misaligned: EINVAL). */
static int share_range(int fd, uint64_t src, uint64_t dst, uint64_t len)
{
    struct file_clone_range r = { .src_fd = fd, .src_offset = src, .src_length = len,
                                  .dest_offset = dst };
    return ioctl(fd, FICLONERANGE, &r) == 0 ? 0 : -errno;
}

/* Copy [src, src+len) to [dst, ...) by sharing its whole blocks and copying the
 * unaligned edges through a buffer: 1 when done, 0 (nothing done) when there is
 * no whole block or the file system cannot share -- the probe that tells a
 * reflink file system -- or -errno from the edges. */
static int copy_shared(int fd, uint64_t src, uint64_t dst, uint64_t len)
{
    uint64_t head = (CLONE_ALIGN - src % CLONE_ALIGN) % CLONE_ALIGN;
    if (src % CLONE_ALIGN != dst % CLONE_ALIGN || len < head + CLONE_ALIGN) return 0;
    uint64_t tail = head + (len - head) / CLONE_ALIGN * CLONE_ALIGN;
    if (share_range(fd, src + head, dst + head, tail - head) != 0) return 0;
    int rc = copy_bounce(fd, src, dst, head);
    if (rc == 0) rc = copy_bounce(fd, src + tail, dst + tail, len - tail);
    return rc ? rc : 1;
}

int ts_writeback(int fd, const int64_t *runs, uint64_t n_runs, uint64_t window)
{
    if (window == 0) return TS_E_ARG;
    for (uint64_t k = 0; k < n_runs; k++) {
        int64_t off = runs[2 * k], len = runs[2 * k + 1];
        if (off < 0 || len < 0) return TS_E_ARG;
        while (len > 0) {
            int64_t n = len < (int64_t)window ? len : (int64_t)window;
            if (sync_file_range(fd, off, n, SYNC_FILE_RANGE_WAIT_BEFORE |
                                SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) < 0) {
                if (errno == EINTR) continue;
                return -errno;
            }
            off += n;
            len -= n;
        }
    }
    return 0;
}

/* MurmurHash3 x64 128-bit, seed 0 (Austin Appleby's public-domain design), written
 * here from its description; only h1's low 32 bits are kept (chunk_sum). */
static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

uint32_t ts_mmh3_x64_low32(const uint8_t *data, uint64_t len)
{
    const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
    uint64_t h1 = 0, h2 = 0, k1, k2;
    uint64_t nblocks = len / 16;
    for (uint64_t i = 0; i < nblocks; i++) {
        memcpy(&k1, data + 16 * i, 8);          /* little-endian hosts (x86, arm64) */
        memcpy(&k2, data + 16 * i + 8, 8);
        k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
        h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
        k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
        h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
    }
    const uint8_t *tail = data + 16 * nblocks;
    uint64_t rest = len & 15;
    k1 = 0;
    k2 = 0;
    for (uint64_t i = rest; i > 8; i--)
        k2 ^= (uint64_t)tail[i - 1] << (8 * (i - 9));
    if (rest > 8) {
        k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
    }
    for (uint64_t i = rest < 8 ? rest : 8; i > 0; i--)
        k1 ^= (uint64_t)tail[i - 1] << (8 * (i - 1));
    if (rest) {
        k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
    }
    h1 ^= len;
    h2 ^= len;
    h1 += h2;
    h2 += h1;
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1 += h2;
    uint32_t low = (uint32_t)h1;
    return low ? low : 1;
}

#define HASH_BATCH (256u << 10)

int ts_hash_chunks(int fd, const int64_t *ids, uint64_t n, uint64_t chunk_size, uint32_t *out)
{
    if (chunk_size == 0 || chunk_size > (1u << 30)) return TS_E_ARG;
    uint64_t per = HASH_BATCH / chunk_size ? HASH_BATCH / chunk_size : 1;
    uint8_t *buf = malloc(per * chunk_size);
    if (!buf) return -ENOMEM;
    int rc = 0;
    for (uint64_t k = 0; k < n && rc == 0;) {
        if (ids[k] < 0) { rc = TS_E_ARG; break; }
        uint64_t run = 1;           /* ids[k], ids[k] + 1, ... read at once */
        while (k + run < n && run < per && ids[k + run] == ids[k] + (int64_t)run) run++;
        uint64_t want = run * chunk_size, got = 0;
        off_t at = (off_t)((uint64_t)ids[k] * chunk_size);
        while (got < want) {
            ssize_t r = pread(fd, buf + got, want - got, at + (off_t)got);
            if (r < 0) {
                if (errno == EINTR) continue;
                rc = -errno;
                break;
            }
            if (r == 0) {           /* past the end of the file: zeros */
                memset(buf + got, 0, want - got);
                break;
            }
            got += (uint64_t)r;
        }
        for (uint64_t i = 0; i < run && rc == 0; i++)
            out[k + i] = ts_mmh3_x64_low32(buf + i * chunk_size, chunk_size);
        k += run;
    }
    free(buf);
    return rc;
}

int ts_cow_copy(int fd, uint64_t src, uint64_t dst, uint64_t length)
{
    /* The whole file-system blocks of the range are shared where the file system
     * can (btrfs, xfs: no bytes move); the rest, and everything elsewhere, goes
     * through a buffer.  Measured on ext4's page cache, a buffered copy into a new
     * chunk costs 0.6 of copy_file_range's in-kernel copy, which works page by page. */
    int rc = copy_shared(fd, src, dst, length);
    return rc < 0 ? rc : rc ? 0 : copy_bounce(fd, src, dst, length);
}

int ts_is_zero(const uint8_t *buf, uint64_t length)
{
    uint64_t i = 0;
    for (; i < length && ((uintptr_t)(buf + i) & 7); i++)
        if (buf[i]) return 0;
    for (; i + 64 <= length; i += 64) {
        const uint64_t *w = (const uint64_t *)(buf + i);
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) return 0;
    }
    for (; i < length; i++)
        if (buf[i]) return 0;
    return 1;
}

/* ---- translation ------------------------------------------------------- */

/* Append (voff, len, doff) to out, merging with the previous row when both are
 * holes or the data continues the previous row's data. */
static inline int emit(int64_t *out, uint64_t out_rows, int64_t *rows,
                       uint64_t voff, uint64_t len, int64_t doff)
{
    if (*rows > 0) {
        int64_t *p = out + (*rows - 1) * 3;
        if ((doff < 0 && p[2] < 0) || (doff >= 0 && p[2] >= 0 && p[2] + p[1] == doff)) {
            p[1] += (int64_t)len;
            return 0;
        }
    }
    if ((uint64_t)*rows >= out_rows) return TS_E_SPACE;
    int64_t *r = out + *rows * 3;
    r[0] = (int64_t)voff; r[1] = (int64_t)len; r[2] = doff;
    (*rows)++;
    return 0;
}

int64_t ts_translate(const uint64_t *dir, uint64_t n_dir,
                     const uint64_t *pages, uint64_t n_pages,
                     unsigned chunk_shift, uint64_t offset, uint64_t length,
                     int64_t *out, uint64_t out_rows)
{
    if (chunk_shift > 40) return TS_E_ARG;
    int64_t rows = 0;
    uint64_t end = offset + length, csize = 1ull << chunk_shift;
    for (uint64_t pos = offset; pos < end;) {
        uint64_t v = pos >> chunk_shift, cstart = v << chunk_shift;
        uint64_t stop = cstart + csize < end ? cstart + csize : end;
        int err = 0;
        uint64_t c = lookup(dir, n_dir, pages, n_pages, v, &err);
        if (err) return err;
        int64_t doff = c ? (int64_t)((c << chunk_shift) + (pos - cstart)) : -1;
        int rc = emit(out, out_rows, &rows, pos, stop - pos, doff);
        if (rc) return rc;
        pos = stop;
    }
    return rows;
}

int64_t ts_count_write_allocs(const ts_pool *p, const ts_dev *dev,
                              uint64_t offset, uint64_t length)
{
    if (length == 0) return 0;
    if (p->chunk_shift > 40) return TS_E_ARG;
    uint64_t first = offset >> p->chunk_shift, last = (offset + length - 1) >> p->chunk_shift;
    int64_t need = 0;
    for (uint64_t v = first; v <= last; v++) {
        int err = 0;
        uint64_t c = lookup(dev->dir, dev->n_dir, p->pages, p->n_pages, v, &err);
        if (err) return err;
        if (c >= p->n_chunks) return TS_E_CORRUPT;
        if (c == 0 || p->chunk_ref[c] > 1 || (p->chunk_state[c] & TS_ST_PINNED)) need++;
    }
    return need;
}

/* ---- reference counts -------------------------------------------------- */

int ts_shadow_page(uint64_t *pages, uint64_t n_pages, uint64_t src, uint64_t dst,
                   uint32_t *chunk_ref, uint8_t *chunk_state, uint8_t *chunk_summary,
                   uint64_t n_chunks)
{
    if (src >= n_pages || dst >= n_pages) return TS_E_CORRUPT;
    const uint64_t *s = pages + src * TS_FANOUT;
    for (int i = 0; i < TS_FANOUT; i++)
        if (s[i] >= n_chunks) return TS_E_CORRUPT;
    memmove(pages + dst * TS_FANOUT, s, TS_FANOUT * sizeof(uint64_t));
    for (int i = 0; i < TS_FANOUT; i++) {
        uint64_t c = s[i];
        if (c) { chunk_ref[c] += 1; mark(chunk_state, chunk_summary, c, TS_ST_REF_CHANGED); }
    }
    return 0;
}

/* Decrement each of ids[k] in turn (zeros skipped).  If a count would drop
 * below zero, restore the ones already done and fail: all or nothing. */
static int dec_all(uint32_t *ref, const uint64_t *ids, uint64_t k)
{
    uint64_t i;
    for (i = 0; i < k; i++) {
        uint64_t c = ids[i];
        if (!c) continue;
        if (ref[c] == 0) break;
        ref[c] -= 1;
    }
    if (i == k) return 0;
    for (uint64_t j = 0; j < i; j++)
        if (ids[j]) ref[ids[j]] += 1;
    return TS_E_UNDERFLOW;
}

/* The flags a decrement leaves, from the count after the whole batch (as the
 * twin does): PENDING_FREE when it reached zero, PINNED otherwise. */
static inline void dec_flags(const uint32_t *ref, uint8_t *state, uint8_t *summary, uint64_t c)
{
    mark(state, summary, c, TS_ST_REF_CHANGED | (ref[c] == 0 ? TS_ST_PENDING_FREE : TS_ST_PINNED));
}

int ts_ref_batch(uint32_t *chunk_ref, uint8_t *chunk_state, uint8_t *chunk_summary,
                 uint64_t n_chunks, const uint64_t *ids, uint64_t k, int delta)
{
    if (delta != 1 && delta != -1) return TS_E_ARG;
    for (uint64_t i = 0; i < k; i++)
        if (ids[i] >= n_chunks) return TS_E_CORRUPT;
    if (delta < 0) {
        int rc = dec_all(chunk_ref, ids, k);
        if (rc) return rc;
        for (uint64_t i = 0; i < k; i++)
            if (ids[i]) dec_flags(chunk_ref, chunk_state, chunk_summary, ids[i]);
        return 0;
    }
    for (uint64_t i = 0; i < k; i++) {
        uint64_t c = ids[i];
        if (c) { chunk_ref[c] += 1; mark(chunk_state, chunk_summary, c, TS_ST_REF_CHANGED); }
    }
    return 0;
}

/* Entry of virtual chunk v for unmapping, NULL under a missing page; its page
 * id in *pid.  *err is set when an id lies outside its array. */
static inline uint64_t *unmap_entry(uint64_t *dir, uint64_t n_dir, uint64_t *pages,
                                    uint64_t n_pages, uint64_t n_chunks, uint64_t v,
                                    uint64_t *pid, int *err)
{
    if (v / TS_FANOUT >= n_dir) { *err = TS_E_CORRUPT; return NULL; }
    *pid = dir[v / TS_FANOUT];
    if (*pid == 0) return NULL;
    if (*pid >= n_pages) { *err = TS_E_CORRUPT; return NULL; }
    uint64_t *e = &pages[*pid * TS_FANOUT + v % TS_FANOUT];
    if (*e >= n_chunks) { *err = TS_E_CORRUPT; return NULL; }
    return e;
}

int64_t ts_unmap_range(ts_pool *p, const ts_dev *dev, uint64_t first, uint64_t count)
{
    uint64_t *dir = dev->dir, n_dir = dev->n_dir, *pages = p->pages, n_pages = p->n_pages;
    uint64_t n_chunks = p->n_chunks;
    uint32_t *chunk_ref = p->chunk_ref;
    /* Pass 1 checks ids and drops the references (undone on underflow), pass 2
     * sets the flags from the final counts and clears the entries: all or
     * nothing, like the twin's single batched ref_batch. */
    uint64_t v, pid;
    int err = 0;
    for (v = first; v < first + count; v++) {
        uint64_t *e = unmap_entry(dir, n_dir, pages, n_pages, n_chunks, v, &pid, &err);
        if (err) break;
        if (!e || !*e) continue;
        if (chunk_ref[*e] == 0) { err = TS_E_UNDERFLOW; break; }
        chunk_ref[*e] -= 1;
    }
    if (err) {
        for (uint64_t u = first; u < v; u++) {
            uint64_t *e = unmap_entry(dir, n_dir, pages, n_pages, n_chunks, u, &pid, &err);
            if (e && *e) chunk_ref[*e] += 1;
        }
        return err;
    }
    int64_t done = 0;
    for (v = first; v < first + count; v++) {
        uint64_t *e = unmap_entry(dir, n_dir, pages, n_pages, n_chunks, v, &pid, &err);
        if (!e || !*e) continue;
        dec_flags(chunk_ref, p->chunk_state, p->chunk_summary, *e);
        *e = 0;
        p->page_dirty[pid] = 1;
        done++;
    }
    return done;
}

int ts_count_mapped(const uint64_t *dir, uint64_t n_dir, const uint64_t *pages,
                    const uint32_t *page_ref, uint64_t n_pages,
                    const uint32_t *chunk_ref, uint64_t n_chunks, int64_t *out)
{
    int64_t used = 0, excl = 0;
    for (uint64_t d = 0; d < n_dir; d++) {
        uint64_t pid = dir[d];
        if (pid == 0) continue;
        if (pid >= n_pages) return TS_E_CORRUPT;
        const uint64_t *p = pages + pid * TS_FANOUT;
        int page_excl = page_ref[pid] == 1;
        for (int i = 0; i < TS_FANOUT; i++) {
            uint64_t c = p[i];
            if (!c) continue;
            if (c >= n_chunks) return TS_E_CORRUPT;
            used++;
            excl += page_excl && chunk_ref[c] == 1;
        }
    }
    out[0] = used;
    out[1] = excl;
    return 0;
}

/* ---- the request data path -------------------------------------------- */

int ts_read_range(const uint64_t *dir, uint64_t n_dir,
                  const uint64_t *pages, uint64_t n_pages,
                  unsigned chunk_shift, int fd,
                  uint8_t *buf, uint64_t offset, uint64_t length)
{
    /* Walk the chunks, growing one extent (hole or contiguous data) at a time
     * and issuing it when the next chunk does not continue it. */
    if (chunk_shift > 40) return TS_E_ARG;
    uint64_t end = offset + length, csize = 1ull << chunk_shift;
    uint64_t run_v = offset, run_len = 0;
    int64_t run_d = -1;
    for (uint64_t pos = offset; pos <= end;) {
        uint64_t piece = 0;
        int64_t doff = -2;  /* sentinel: flush at the end */
        if (pos < end) {
            uint64_t v = pos >> chunk_shift, cstart = v << chunk_shift;
            piece = (cstart + csize < end ? cstart + csize : end) - pos;
            int err = 0;
            uint64_t c = lookup(dir, n_dir, pages, n_pages, v, &err);
            if (err) return err;
            doff = c ? (int64_t)((c << chunk_shift) + (pos - cstart)) : -1;
            if (run_len && ((doff < 0 && run_d < 0) ||
                            (doff >= 0 && run_d >= 0 && run_d + (int64_t)run_len == doff))) {
                run_len += piece;
                pos += piece;
                continue;
            }
        }
        if (run_len) {
            uint8_t *dst = buf + (run_v - offset);
            if (run_d < 0) memset(dst, 0, run_len);
            else {
                int rc = pread_full(fd, dst, run_len, (uint64_t)run_d);
                if (rc) return rc;
            }
        }
        if (pos == end) break;
        run_v = pos; run_len = piece; run_d = doff;
        pos += piece;
    }
    return 0;
}

/* The batch of data writes of one ts_write: pieces contiguous in the
 * file join the pending run; anything else flushes it first. */
struct run { int fd; const uint8_t *buf; uint64_t off, len; };

static int run_flush(struct run *r)
{
    int rc = r->len ? pwrite_full(r->fd, r->buf, r->len, r->off) : 0;
    r->len = 0;
    return rc;
}

static int run_add(struct run *r, const uint8_t *buf, uint64_t off, uint64_t len)
{
    if (r->len && r->off + r->len == off && r->buf + r->len == buf) {
        r->len += len;
        return 0;
    }
    int rc = run_flush(r);
    r->buf = buf; r->off = off; r->len = len;
    return rc;
}

/* Where blocks cannot be shared: the new chunk whole in one pwrite, the old
 * chunk's bytes around the write's piece data[lo, hi).  Two syscalls instead of
 * a copy per uncovered part and a write for the piece: the cost of a copy on
 * write into a new chunk is mostly per call and per page the file system
 * allocates, not per byte. */
static __attribute__((noinline)) int cow_merged(int fd, uint64_t obase, uint64_t nbase,
                                                uint64_t csize, uint64_t lo, uint64_t hi,
                                                const uint8_t *data)
{
    uint8_t stack[BOUNCE_SIZE];
    uint8_t *b = csize <= sizeof stack ? stack : malloc(csize);
    if (!b) return -ENOMEM;
    int rc;
    if (hi - lo <= csize / 2) {   /* one read of the old chunk beats two small ones */
        rc = pread_full(fd, b, csize, obase);
    } else {
        rc = pread_full(fd, b, lo, obase);
        if (rc == 0) rc = pread_full(fd, b + hi, csize - hi, obase + hi);
    }
    if (rc == 0) {
        memcpy(b + lo, data, hi - lo);
        rc = pwrite_full(fd, b, csize, nbase);
    }
    if (b != stack) free(b);
    return rc;
}

/* Give virtual chunk entry *e a fresh chunk from new_chunks, preparing the
 * parts [0, lo) and [hi, csize) the write leaves alone: zeros for a new
 * mapping, the old chunk's bytes for a copy on write.  *written = 1 when the
 * write's own bytes (data, for [lo, hi)) went out with them. */
static int take_new_chunk(ts_pool *p, uint64_t *e, uint64_t old,
                          const int64_t *new_chunks, uint64_t n_new, uint64_t *next_new,
                          uint64_t lo, uint64_t hi, const uint8_t *data, int *written)
{
    unsigned shift = p->chunk_shift;
    int fd = p->fd;
    uint64_t n_chunks = p->n_chunks;
    uint32_t *ref = p->chunk_ref;
    int64_t *counters = p->counters;
    if (*next_new >= n_new) return TS_E_NOCHUNK;
    int64_t n = new_chunks[(*next_new)++];
    if (n <= 0 || (uint64_t)n >= n_chunks) return TS_E_CORRUPT;
    uint64_t csize = 1ull << shift, nbase = (uint64_t)n << shift;
    int rc;
    *written = 0;
    if (old == 0) {
        rc = punch(fd, nbase, lo);
        if (rc == 0) rc = punch(fd, nbase + hi, csize - hi);
        counters[0] += 1;
    } else {
        uint64_t obase = old << shift;
        /* a reflink file system shares the uncovered blocks (the first part that has
         * a whole block tells); elsewhere, bytes move */
        int shared = 0;
        rc = 0;
        if (lo > 0 || hi < csize) {
            shared = copy_shared(fd, obase, nbase, lo);
            if (shared == 1) {
                rc = ts_cow_copy(fd, obase + hi, nbase + hi, csize - hi);
            } else if (shared == 0) {
                shared = copy_shared(fd, obase + hi, nbase + hi, csize - hi);
                if (shared == 1) rc = copy_bounce(fd, obase, nbase, lo);
            }
            if (shared < 0) {
                rc = shared;
            } else if (shared == 0) {
                rc = cow_merged(fd, obase, nbase, csize, lo, hi, data);
                *written = rc == 0;
            }
        }
        if (rc == 0) rc = ref_dec(ref, p->chunk_state, p->chunk_summary, old);
        counters[0] += 1;
        counters[1] += 1;
        counters[2] += (int64_t)(lo + csize - hi);
    }
    if (rc) return rc;
    ref[n] = 1;
    p->chunk_state[n] = 0;                         /* a fresh chunk: no stale flags */
    mark(p->chunk_state, p->chunk_summary, (uint64_t)n, TS_ST_REF_CHANGED | TS_ST_WRITTEN);
    *e = (uint64_t)n;
    return 0;
}

/* TS_ST_REHASH on every chunk mapped in [offset, offset+length) of dev, once the
 * write's bytes are in the file (checksums on only). */
static void mark_rehash(ts_pool *p, const ts_dev *dev, uint64_t offset, uint64_t length)
{
    if (!p->n_sums || !length) return;
    unsigned shift = p->chunk_shift;
    for (uint64_t v = offset >> shift; v <= (offset + length - 1) >> shift; v++) {
        uint64_t pid;
        uint64_t *e = entry_ptr(dev->dir, dev->n_dir, p->pages, p->n_pages, v, &pid);
        if (e && *e && *e < p->n_chunks)
            mark(p->chunk_state, p->chunk_summary, *e, TS_ST_REHASH);
    }
}

void ts_state_clear(uint8_t *state, uint64_t n_state, const int64_t *ids, uint64_t n,
                    uint8_t flags)
{
    for (uint64_t k = 0; k < n; k++)
        if (ids[k] >= 0 && (uint64_t)ids[k] < n_state)
            __atomic_fetch_and(&state[ids[k]], (uint8_t)~flags, __ATOMIC_SEQ_CST);
}

static int write_given_run(ts_pool *p, const ts_dev *dev, const int64_t *new_chunks,
                           uint64_t n_new, const uint8_t *buf, uint64_t offset,
                           uint64_t length);

/* TS_REQ_GIVEN: the write itself, with the new chunks given; then TS_ST_REHASH,
 * whether or not it failed part way (what it wrote is unknown then). */
static int write_given(ts_pool *p, const ts_dev *dev, const int64_t *new_chunks, uint64_t n_new,
                       const uint8_t *buf, uint64_t offset, uint64_t length)
{
    int rc = write_given_run(p, dev, new_chunks, n_new, buf, offset, length);
    mark_rehash(p, dev, offset, length);
    return rc;
}

static int write_given_run(ts_pool *p, const ts_dev *dev, const int64_t *new_chunks, uint64_t n_new,
                       const uint8_t *buf, uint64_t offset, uint64_t length)
{
    unsigned chunk_shift = p->chunk_shift;
    if (chunk_shift > 40) return TS_E_ARG;
    uint64_t end = offset + length, csize = 1ull << chunk_shift, next_new = 0;
    struct run run = { p->fd, buf, 0, 0 };
    for (uint64_t pos = offset; pos < end;) {
        uint64_t v = pos >> chunk_shift, cstart = v << chunk_shift, pid;
        uint64_t lo = pos - cstart, hi = (cstart + csize < end ? cstart + csize : end) - cstart;
        uint64_t *e = entry_ptr(dev->dir, dev->n_dir, p->pages, p->n_pages, v, &pid);
        if (!e || *e >= p->n_chunks) return TS_E_CORRUPT;
        uint64_t c = *e;
        const uint8_t *piece = buf + (pos - offset);
        int written = 0;
        if (c == 0 || p->chunk_ref[c] > 1 || (p->chunk_state[c] & TS_ST_PINNED)) {
            int rc = take_new_chunk(p, e, c, new_chunks, n_new, &next_new, lo, hi, piece,
                                    &written);
            if (rc) return rc;
            p->page_dirty[pid] = 1;
        } else {
            mark(p->chunk_state, p->chunk_summary, c, TS_ST_WRITTEN);
        }
        if (!written) {
            int rc = run_add(&run, piece, (*e << chunk_shift) + lo, hi - lo);
            if (rc) return rc;
        }
        pos = cstart + hi;
    }
    int rc = run_flush(&run);
    if (rc == 0) p->counters[3] += (int64_t)length;
    return rc;
}

/* ---- the fast write ---------------------------------------------------- */

#define FAST_SCAN_MAX 65536

/* Up to `need` free chunks into out[], in SpaceMap.allocate's order; 1 if found. */
static int fast_allocate(const uint32_t *ref, const uint8_t *state, uint64_t n_chunks,
                         int64_t *cursor, uint64_t need, int64_t *out)
{
    if (need == 0) return 1;
    uint64_t start = (*cursor >= 1 && (uint64_t)*cursor < n_chunks) ? (uint64_t)*cursor : 1;
    uint64_t got = 0, c = start, looked = 0;
    int wrapped = 0;
    while (got < need && looked < FAST_SCAN_MAX) {
        if (c >= n_chunks) {
            if (wrapped || start == 1) return 0;
            c = 1; wrapped = 1;
        }
        if (wrapped && c >= start) return 0;
        if (ref[c] == 0 && !(state[c] & TS_ST_PENDING_FREE)) out[got++] = (int64_t)c;
        c++; looked++;
    }
    if (got < need) return 0;
    uint64_t next = (uint64_t)out[got - 1] + 1;
    *cursor = next < n_chunks ? (int64_t)next : 1;
    return 1;
}

int ts_prealloc(int fd, unsigned chunk_shift, uint64_t n_chunks, int64_t *cursor,
                const int64_t *ids, uint64_t k)
{
    int calls = 0;
    if (chunk_shift > 40) return 0;
    uint64_t span = (uint64_t)TS_PREALLOC_BYTES >> chunk_shift;
    if (span == 0) span = 1;
    for (uint64_t i = 0; i < k; i++) {
        if (ids[i] <= 0 || (uint64_t)ids[i] >= n_chunks) continue;
        uint64_t c = (uint64_t)ids[i];
        if (cursor[1] >= 0 && c >= (uint64_t)cursor[1] && c < (uint64_t)cursor[2]) continue;
        uint64_t hi = c + span < n_chunks ? c + span : n_chunks;
        calls++;
        if (fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)(c << chunk_shift),
                      (off_t)((hi - c) << chunk_shift)) != 0)
            hi = c + 1;
        cursor[1] = (int64_t)c;
        cursor[2] = (int64_t)hi;
    }
    return calls;
}

/* TS_REQ_LOCKED: the checks, the allocation and the write intent, then the
 * write; TS_SLOW also when the write needs more than max_need chunks. */
static int64_t write_checked(ts_pool *p, const ts_dev *dev, const uint8_t *buf,
                             uint64_t offset, uint64_t length, uint64_t max_need)
{
    unsigned chunk_shift = p->chunk_shift;
    if (chunk_shift > 40 || length == 0) return TS_SLOW;
    uint64_t first = offset >> chunk_shift, last = (offset + length - 1) >> chunk_shift;
    if (last - first >= TS_FAST_MAX_CHUNKS || ts_is_zero(buf, length)) return TS_SLOW;
    uint64_t need = 0, n_hot = 0, hot[TS_FAST_MAX_CHUNKS];
    const uint32_t *chunk_ref = p->chunk_ref, *chunk_sums = p->chunk_sums;
    const uint8_t *chunk_state = p->chunk_state;
    uint64_t n_chunks = p->n_chunks, n_sums = p->n_sums;
    for (uint64_t v = first; v <= last; v++) {
        uint64_t d = v / TS_FANOUT, pid;
        if (d >= dev->n_dir) return TS_SLOW;
        pid = dev->dir[d];
        if (pid == 0 || pid >= p->n_pages || p->page_ref[pid] != 1) return TS_SLOW;
        /* a row not read from meta yet looks all holes: never write into it */
        if (!p->page_loaded[pid]) return TS_SLOW;
        uint64_t c = p->pages[pid * TS_FANOUT + v % TS_FANOUT];
        if (c >= n_chunks) return TS_SLOW;
        if (c == 0 || chunk_ref[c] > 1 || (chunk_state[c] & TS_ST_PINNED)) need++;
        if (c && n_sums && (c >= n_sums || (chunk_sums[c] && !(chunk_state[c] & TS_ST_WRITTEN)))) {
            uint64_t r = c >> p->intent_shift;
            if (c >= n_sums || r >= p->n_bits || !p->intent_bits[r]) return TS_SLOW;
            hot[n_hot++] = r;
        }
    }
    if (need > max_need) return TS_SLOW;
    int64_t fresh[TS_FAST_MAX_CHUNKS];
    if (!fast_allocate(chunk_ref, chunk_state, n_chunks, p->cursor, need, fresh)) return TS_SLOW;
    if (need) ts_prealloc(p->fd, chunk_shift, n_chunks, p->cursor, fresh, need);
    for (uint64_t i = 0; i < n_hot; i++) p->intent_hot[hot[i]] = 1;
    int rc = write_given(p, dev, fresh, need, buf, offset, length);
    return rc ? rc : (int64_t)need;
}

/* ---- the lane ------------------------------------------------------------ */

#define GATE_READERS (TS_GATE_WRITER - 1)

static inline int closing(const int *counter)
{
    return __atomic_load_n(counter, __ATOMIC_SEQ_CST) != 0;
}

/* Leave the gate (give back `unit`); wake closers waiting for lane requests. */
static void lane_leave(ts_pool *l, int64_t unit)
{
    __atomic_sub_fetch(&l->gate, unit, __ATOMIC_SEQ_CST);
    if (closing(&l->closers)) {
        __atomic_add_fetch(&l->wake, 1, __ATOMIC_SEQ_CST);
        syscall(SYS_futex, &l->wake, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    }
}

/* TS_REQ_LANE: TS_REQ_LOCKED behind the gate, within the budget. */
static int64_t write_lane(ts_pool *l, const ts_dev *dev, const uint8_t *buf,
                          uint64_t offset, uint64_t length)
{
    if (!dev->writable || length == 0 || offset > dev->size || length > dev->size - offset)
        return TS_SLOW;
    int64_t empty = 0;
    if (closing(&l->closers) ||
        !__atomic_compare_exchange_n(&l->gate, &empty, TS_GATE_WRITER, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_RELAXED))
        return TS_SLOW;
    int64_t rc = TS_SLOW;
    if (l->open && l->writes) {
        rc = write_checked(l, dev, buf, offset, length, l->budget > 0 ? (uint64_t)l->budget : 0);
        if (rc != TS_SLOW) {
            l->wrote = 1;
            if (rc > 0) l->budget -= rc;
        }
    }
    lane_leave(l, TS_GATE_WRITER);
    return rc;
}

int64_t ts_write(ts_pool *p, const ts_dev *dev, const uint8_t *buf, uint64_t offset,
                 uint64_t length, int mode, const int64_t *new_chunks, uint64_t n_new)
{
    switch (mode) {
    case TS_REQ_GIVEN:
        return write_given(p, dev, new_chunks, n_new, buf, offset, length);
    case TS_REQ_LOCKED:
        return write_checked(p, dev, buf, offset, length, UINT64_MAX);
    case TS_REQ_LANE:
        return write_lane(p, dev, buf, offset, length);
    default:
        return TS_E_ARG;
    }
}

/* 1 when every chunk of [first, last] can be read by the lane (see the header). */
static int lane_readable(const ts_pool *l, const ts_dev *dev, uint64_t first,
                         uint64_t last)
{
    for (uint64_t v = first; v <= last; v++) {
        uint64_t d = v / TS_FANOUT;
        if (d >= dev->n_dir) return 0;
        uint64_t pid = dev->dir[d];
        if (pid == 0) continue;                       /* no page: a hole, zeros */
        if (pid >= l->n_pages || !l->page_loaded[pid]) return 0;
        uint64_t c = l->pages[pid * TS_FANOUT + v % TS_FANOUT];
        if (c == 0 || l->n_sums == 0) continue;
        if (c >= l->n_sums || c >= l->n_chunks) return 0;
        if (l->chunk_sums[c] && !l->chunk_verified[c] && !(l->chunk_state[c] & TS_ST_WRITTEN))
            return 0;
    }
    return 1;
}

/* What the map says of chunks [first, last] of dev: TS_RUNS_HOLE, _DATA or _MIXED. */
static int64_t map_runs(const ts_pool *l, const ts_dev *dev, uint64_t first, uint64_t last)
{
    int seen = 0;
    for (uint64_t v = first; v <= last; v++) {
        int err = 0;
        uint64_t c = lookup(dev->dir, dev->n_dir, l->pages, l->n_pages, v, &err);
        if (err) return err;
        seen |= c ? 2 : 1;
    }
    return seen == 3 ? TS_RUNS_MIXED : seen == 2 ? TS_RUNS_DATA : TS_RUNS_HOLE;
}

/* TS_REQ_LANE: ts_read_range beside other readers, when the lane may; with
 * runs, the map's verdict on the range (ts_read_runs) instead of 0. */
static int64_t read_lane(ts_pool *l, const ts_dev *dev, uint8_t *buf, uint64_t offset,
                         uint64_t length, int runs)
{
    if (length == 0 || offset > dev->size || length > dev->size - offset || l->chunk_shift > 40)
        return TS_SLOW;
    uint64_t first = offset >> l->chunk_shift, last = (offset + length - 1) >> l->chunk_shift;
    if (last - first >= TS_FAST_MAX_CHUNKS) return TS_SLOW;
    int64_t g = __atomic_load_n(&l->gate, __ATOMIC_SEQ_CST);
    do {
        if ((g & (TS_GATE_WRITER | TS_GATE_EXCLUSIVE)) || closing(&l->excl_closers))
            return TS_SLOW;
    } while (!__atomic_compare_exchange_n(&l->gate, &g, g + TS_GATE_READER, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    int64_t rc = TS_SLOW;
    if (l->open && lane_readable(l, dev, first, last)) {
        rc = ts_read_range(dev->dir, dev->n_dir, l->pages, l->n_pages, l->chunk_shift, l->fd,
                           buf, offset, length);
        if (rc == 0 && runs) rc = map_runs(l, dev, first, last);
    }
    lane_leave(l, TS_GATE_READER);
    return rc;
}

int ts_gate_enter_reader(ts_pool *l)
{
    int64_t g = __atomic_load_n(&l->gate, __ATOMIC_SEQ_CST);
    do {
        if ((g & (TS_GATE_WRITER | TS_GATE_EXCLUSIVE)) || closing(&l->excl_closers))
            return 0;
    } while (!__atomic_compare_exchange_n(&l->gate, &g, g + TS_GATE_READER, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    if (l->open)
        return 1;
    lane_leave(l, TS_GATE_READER);
    return 0;
}

void ts_gate_leave_reader(ts_pool *l)
{
    lane_leave(l, TS_GATE_READER);
}

int64_t ts_read_runs(ts_pool *p, const ts_dev *dev, uint8_t *buf, uint64_t offset,
                     uint64_t length)
{
    return read_lane(p, dev, buf, offset, length, 1);
}

int64_t ts_read(ts_pool *p, const ts_dev *dev, uint8_t *buf, uint64_t offset,
                uint64_t length, int mode)
{
    switch (mode) {
    case TS_REQ_LOCKED:
        return ts_read_range(dev->dir, dev->n_dir, p->pages, p->n_pages, p->chunk_shift, p->fd,
                             buf, offset, length);
    case TS_REQ_LANE:
        return read_lane(p, dev, buf, offset, length, 0);
    default:
        return TS_E_ARG;
    }
}

void ts_gate_announce(ts_pool *l, int exclusive)
{
    __atomic_add_fetch(&l->closers, 1, __ATOMIC_SEQ_CST);
    if (exclusive) __atomic_add_fetch(&l->excl_closers, 1, __ATOMIC_SEQ_CST);
}

void ts_gate_withdraw(ts_pool *l, int exclusive)
{
    if (exclusive) __atomic_sub_fetch(&l->excl_closers, 1, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&l->closers, 1, __ATOMIC_SEQ_CST);
}

void ts_gate_close(ts_pool *l, int exclusive)
{
    /* a shared holder waits for a lane write; the exclusive one for lane reads too */
    int64_t busy = exclusive ? (TS_GATE_WRITER | GATE_READERS) : TS_GATE_WRITER;
    int64_t unit = exclusive ? TS_GATE_EXCLUSIVE : TS_GATE_SHARED;
    for (unsigned spins = 0;; spins++) {
        uint32_t w = __atomic_load_n(&l->wake, __ATOMIC_SEQ_CST);
        int64_t g = __atomic_load_n(&l->gate, __ATOMIC_SEQ_CST);
        if (!(g & busy)) {
            if (__atomic_compare_exchange_n(&l->gate, &g, g + unit, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
                break;
            continue;
        }
        if (spins < 100) continue;              /* a lane request takes microseconds */
        /* ...unless its thread is off the CPU: sleep until a request leaves */
        struct timespec limit = {0, 1000000};
        syscall(SYS_futex, &l->wake, FUTEX_WAIT_PRIVATE, w, &limit, NULL, 0);
    }
    ts_gate_withdraw(l, exclusive);
}

void ts_gate_open(ts_pool *l, int exclusive)
{
    __atomic_sub_fetch(&l->gate, exclusive ? TS_GATE_EXCLUSIVE : TS_GATE_SHARED,
                       __ATOMIC_SEQ_CST);
}
