/*
 * thinstore_native.h -- the whole contract of thinstore's native hot path.
 *
 * Everything the C side does is declared and documented here; _native/build.py
 * feeds the block between the cdef markers to cffi verbatim, so this header is
 * also the binding.  The Python twins in thinstore/kernels.py implement the same
 * functions and are the test oracle; thinstore/native.py wraps these calls.
 *
 * Data layout (all arrays C-contiguous, owned by the Python caller):
 *   dir[n_dir]            uint64  map page id per TS_FANOUT virtual chunks, 0 = none
 *   pages[n_pages*FANOUT] uint64  row p = map page p (row 0 unused); entry = data
 *                                 chunk id, 0 = unmapped (chunk 0 is never allocated)
 *   page_dirty[n_pages]   uint8   set to 1 when a page's entries change
 *   chunk_ref[n_chunks]   uint32  map entries referencing the chunk
 *   chunk_state[n_chunks] uint8   TS_ST_* flags
 *   Virtual chunk v lives in dir[v / FANOUT], slot v % FANOUT; data chunk c sits at
 *   byte c << chunk_shift of the data file.
 *
 * Rules every function keeps:
 *   - One call per request or range, never per chunk; no call allocates memory
 *     for its result (the caller passes output arrays with their sizes).
 *   - Every id read from an array is bounds-checked against the array length
 *     passed alongside it, so damaged metadata gives TS_E_CORRUPT, never a crash.
 *   - Nothing here touches Python: cffi releases the GIL for the whole call, so
 *     I/O runs while other threads run.  The caller serialises calls that mutate
 *     the same arrays (the pool lock).
 *   - Return: >= 0 is the result; < 0 is -errno for an I/O failure (the wrapper
 *     raises OSError) or one of the TS_E_* codes below (all below -TS_E_BASE).
 *     After an I/O error in ts_write_range the map may be partially updated, as
 *     with the twin; the open transaction is then abandoned by the caller.
 */
#ifndef THINSTORE_NATIVE_H
#define THINSTORE_NATIVE_H

#include <stdint.h>

/* cdef-begin: everything up to cdef-end is parsed by cffi. */

/* Bumped whenever a signature or semantics here changes; native.py refuses a
 * build whose ts_api_version() differs from the one it was written for. */
#define TS_API_VERSION 6

#define TS_FANOUT 508

#define TS_ST_PENDING_FREE 1  /* ref fell to 0 in the open txn; not reusable until commit */
#define TS_ST_PINNED 2        /* ref fell but is nonzero in the open txn: copy on write  */
#define TS_ST_WRITTEN 4       /* data written since the last commit                      */
#define TS_ST_REF_CHANGED 8   /* refcount changed since the last commit                  */

#define TS_E_BASE 100000
#define TS_E_CORRUPT -100001    /* an id points outside its array, or a write hits a missing page */
#define TS_E_UNDERFLOW -100002  /* a reference count would drop below zero                 */
#define TS_E_NOCHUNK -100003    /* write_range ran out of preallocated new chunks          */
#define TS_E_SPACE -100004      /* the output array is too small                           */
#define TS_E_ARG -100005        /* bad argument: delta not +-1, shift out of range         */
#define TS_SLOW -100006         /* ts_write_fast: not the common case; nothing was changed  */
#define TS_FAST_MAX_CHUNKS 64   /* ts_write_fast takes requests spanning at most this many */

/* The API version this library was compiled with (TS_API_VERSION). */
int ts_api_version(void);

/*
 * Translate the byte range [offset, offset+length) of a device into extents.
 * Writes rows (virt_offset, length, data_offset) into out[out_rows][3]; data_offset
 * is -1 for a hole (no page, or entry 0).  Coalesced: adjacent holes merge, and
 * adjacent mapped pieces merge when their data is contiguous in the data file.
 * Returns the number of rows (0 for length 0), TS_E_SPACE if out_rows is too small
 * (chunks in range + 1 always suffices), TS_E_CORRUPT on an out-of-range id.
 */
int64_t ts_translate(const uint64_t *dir, uint64_t n_dir,
                     const uint64_t *pages, uint64_t n_pages,
                     unsigned chunk_shift, uint64_t offset, uint64_t length,
                     int64_t *out, uint64_t out_rows);

/*
 * Shadow a map page: pages[dst] = pages[src], and every nonzero entry c gains a
 * reference (chunk_ref[c] += 1, chunk_state[c] |= REF_CHANGED).  Ids are checked
 * before anything changes.  Returns 0 or TS_E_CORRUPT.
 */
int ts_shadow_page(uint64_t *pages, uint64_t n_pages, uint64_t src, uint64_t dst,
                   uint32_t *chunk_ref, uint8_t *chunk_state, uint64_t n_chunks);

/*
 * Apply delta (+1 or -1) to the reference count of each id in ids[k] (ids may
 * repeat and each occurrence counts; zeros are ignored).  Every id touched gets
 * REF_CHANGED; a decrement also sets, from the count after the whole batch,
 * PENDING_FREE when it is 0 and PINNED otherwise.  All or nothing: if any count
 * would drop below 0 (TS_E_UNDERFLOW) or an id is out of range (TS_E_CORRUPT)
 * nothing changes.  Returns 0 or the error.
 */
int ts_ref_batch(uint32_t *chunk_ref, uint8_t *chunk_state, uint64_t n_chunks,
                 const uint64_t *ids, uint64_t k, int delta);

/*
 * Count the chunks of [offset, offset+length) a write would have to allocate:
 * entry 0 (or no page), or chunk_ref > 1, or state & PINNED.  Returns the count
 * or TS_E_CORRUPT.
 */
int64_t ts_count_write_allocs(const uint64_t *dir, uint64_t n_dir,
                              const uint64_t *pages, uint64_t n_pages,
                              const uint32_t *chunk_ref, const uint8_t *chunk_state,
                              uint64_t n_chunks, unsigned chunk_shift,
                              uint64_t offset, uint64_t length);

/*
 * Write buf[length] at byte offset of the device through its map, on file fd.
 * Each chunk touched, with [lo, hi) the part the write covers:
 *   entry 0   -> take the next of new_chunks; ref = 1, state = REF_CHANGED|WRITTEN; punch
 *                the uncovered parts (fallocate PUNCH_HOLE|KEEP_SIZE, zeros written
 *                where unsupported) so they read zero; entry = new; page dirty.
 *   shared    -> (ref > 1 or PINNED) take the next new chunk; fill the uncovered
 *                parts from the old chunk: its whole 4 KiB blocks shared with
 *                FICLONERANGE where the file system can (then ts_cow_copy for the
 *                rest), else the new chunk written whole in one pwrite -- the old
 *                bytes read around this write's piece; drop one reference from
 *                the old chunk (ref_batch -1 rules); new ref = 1,
 *                state = REF_CHANGED|WRITTEN; entry = new; page dirty.
 *   otherwise -> written in place; WRITTEN.
 * Data landing contiguously in the file goes out in one pwrite.  counters[4] +=
 * (chunks allocated (both cases above), chunks copied on write, bytes copied,
 * bytes written).
 * The page of every chunk in range must exist and be exclusive (caller shadows).
 * Returns 0, -errno on I/O error, TS_E_NOCHUNK, TS_E_CORRUPT or TS_E_UNDERFLOW.
 */
int ts_write_range(uint64_t *dir, uint64_t n_dir,
                   uint64_t *pages, uint64_t n_pages, uint8_t *page_dirty,
                   uint32_t *chunk_ref, uint8_t *chunk_state, uint64_t n_chunks,
                   const int64_t *new_chunks, uint64_t n_new,
                   unsigned chunk_shift, int fd,
                   const uint8_t *buf, uint64_t offset, uint64_t length,
                   int64_t *counters);

/*
 * The common write, whole, in one call: ts_write_range plus the allocation and
 * the checksum bookkeeping the caller would otherwise do around it.
 *
 * It applies when every chunk of [offset, offset+length) lies under a map
 * page with page_ref == 1 (a hole in such a page is fine: a first write; the
 * caller has loaded the pages, since a row not yet read looks all holes), the
 * request spans at most TS_FAST_MAX_CHUNKS chunks and buf is not all zeros.
 * Then:
 *   - need = chunks that are holes (entry 0) or shared (chunk_ref > 1 or
 *     PINNED): each gets a new chunk, as in ts_write_range;
 *   - need free chunks (chunk_ref == 0, not PENDING_FREE) are found scanning up
 *     from *cursor to n_chunks, then from 1 (at most 65536 ids are looked at);
 *     *cursor becomes the last id taken + 1 (1 past the end) -- the order and
 *     cursor rule of SpaceMap.allocate, so both pick the same chunks; then
 *     ts_prealloc for them (cursor is SpaceMap.cursor_arr, int64[3]);
 *   - write intent (n_sums > 0: data checksums on): a chunk with a committed
 *     checksum (chunk_sums[c] != 0) not WRITTEN since the commit gets
 *     intent_hot[c >> intent_shift] = 1; its region must already be marked
 *     durable (intent_bits[r] != 0, r < n_bits) -- DataSums.before_write's
 *     outcome when no intent I/O is needed;
 *   - then ts_write_range with the chunks found.
 * Returns need (>= 0) when written; TS_SLOW, with nothing changed, when any
 * condition fails (a shared or missing page, too few free chunks within
 * the scan, an unmarked intent region, an all-zero buffer, an id out of range):
 * the caller then takes the general path, which does the same write.  After
 * the checks the errors are those of ts_write_range.  A new chunk it maps is
 * not recorded as written-in-part (DataSums.fresh): the commit hashes it from a
 * full read, as it does any chunk Python cannot vouch for.
 */
int64_t ts_write_fast(uint64_t *dir, uint64_t n_dir,
                      uint64_t *pages, uint64_t n_pages,
                      const uint32_t *page_ref, uint8_t *page_dirty,
                      uint32_t *chunk_ref, uint8_t *chunk_state, uint64_t n_chunks,
                      const uint32_t *chunk_sums, uint64_t n_sums,
                      const uint8_t *intent_bits, uint8_t *intent_hot, uint64_t n_bits,
                      int64_t *cursor, int64_t *counters, int fd,
                      unsigned intent_shift, unsigned chunk_shift,
                      const uint8_t *buf, uint64_t offset, uint64_t length);

/*
 * Keep the data file allocated a little ahead of the allocator, so that a new
 * chunk's first write lands on blocks the host file system has already set
 * aside (on ext4 a copy on write into a new chunk costs 11 us instead of 16;
 * its delayed allocation otherwise works page by page).  cursor[1], cursor[2]
 * are the chunk range [lo, hi) preallocated last.  For each of ids[k] outside
 * it, fallocate(FALLOC_FL_KEEP_SIZE) chunks [id, id + TS_PREALLOC_BYTES >>
 * chunk_shift) (at least one, ending at n_chunks) and make that the range.
 * This never changes a byte: blocks already allocated stay as they are, and
 * KEEP_SIZE leaves the file's size alone.  A refusal (no fallocate on this file
 * system, no space) only narrows the range to the chunk: the write that follows
 * reports what matters.  Returns the number of fallocate calls made.
 */
#define TS_PREALLOC_BYTES 4194304
int ts_prealloc(int fd, unsigned chunk_shift, uint64_t n_chunks, int64_t *cursor,
                const int64_t *ids, uint64_t k);

/*
 * Unmap whole virtual chunks [first, first+count): each nonzero entry becomes 0,
 * its chunk loses one reference with ref_batch -1 rules (one batch for the whole
 * range) and its page is marked dirty; chunks under a missing page are skipped.
 * Pages with nonzero entries must be exclusive.  All or nothing.  Returns the
 * number of entries unmapped, TS_E_CORRUPT or TS_E_UNDERFLOW.
 */
int64_t ts_unmap_range(uint64_t *dir, uint64_t n_dir,
                       uint64_t *pages, uint64_t n_pages, uint8_t *page_dirty,
                       uint32_t *chunk_ref, uint8_t *chunk_state, uint64_t n_chunks,
                       uint64_t first, uint64_t count);

/*
 * Read [offset, offset+length) of the device into buf[length]: holes become zeros,
 * each coalesced mapped extent is one pread loop (bytes past the end of the file
 * read as zeros).  Returns 0, -errno, or TS_E_CORRUPT.
 */
int ts_read_range(const uint64_t *dir, uint64_t n_dir,
                  const uint64_t *pages, uint64_t n_pages,
                  unsigned chunk_shift, int fd,
                  uint8_t *buf, uint64_t offset, uint64_t length);

/*
 * Copy [src, src+length) to [dst, dst+length) within fd.  The whole 4 KiB blocks
 * of the range are shared with FICLONERANGE (a reflink on btrfs and xfs: no data
 * moves); where the file system cannot share, and for the unaligned edges, the
 * bytes go through a buffer with pread/pwrite (bytes past the end of the file copy
 * as zeros).  The ranges must not overlap.  Returns 0 or -errno.
 */
int ts_cow_copy(int fd, uint64_t src, uint64_t dst, uint64_t length);

/* 1 if all length bytes of buf are zero, else 0. */
int ts_is_zero(const uint8_t *buf, uint64_t length);

/*
 * Count a device's mapped chunks into out[2] = (used, exclusive): exclusive are
 * those whose page has page_ref 1 and whose chunk has chunk_ref 1.
 * Returns 0 or TS_E_CORRUPT.
 */
int ts_count_mapped(const uint64_t *dir, uint64_t n_dir, const uint64_t *pages,
                    const uint32_t *page_ref, uint64_t n_pages,
                    const uint32_t *chunk_ref, uint64_t n_chunks, int64_t *out);

/*
 * The lane: a device's common read or write in one call from Device.readinto or
 * Device.pwrite, with no Python around it.  ts_write_fast still needs its caller
 * to hold the pool lock and to pass the pool's arrays; the lane holds those
 * arrays itself and takes a gate instead of the lock, so a request that finds
 * the pool idle runs whole in C.
 *
 * ts_lane (one per open pool): the pool's arrays as ts_write_fast takes them,
 * plus page_loaded (a map page's row is in memory) and chunk_verified (a chunk
 * whose checksum a read has checked since it was last written), set by Python
 * (thinstore/fastlane.py) only while the gate is closed, and:
 *   open    0 makes every lane request return TS_SLOW (pool closed);
 *   writes  0 makes lane writes return TS_SLOW (fast writes switched off, or
 *           checksums tracking chunks allocated in this transaction);
 *   budget  chunks lane writes may still allocate before Python must look
 *           (the low-water warning); a write needing more returns TS_SLOW;
 *   wrote   set to 1 by a lane write that got past its checks: the pool has
 *           an open transaction to commit (Python folds and clears it);
 *   gate    who is inside: TS_GATE_READER per lane read, TS_GATE_WRITER for the
 *           one lane write, TS_GATE_SHARED per Python holder of the pool lock's
 *           shared side, TS_GATE_EXCLUSIVE for the holder of its exclusive side.
 *           Lane reads share with lane reads and Python readers (none of them
 *           changes what another reads); a lane write and the exclusive side
 *           are alone;
 *   closers, excl_closers  Python threads waiting for the pool lock or to
 *           close the gate (for the exclusive side, the second too): new lane
 *           writes stand aside for any, new lane reads for the second, so a
 *           closer waits only for the lane requests already inside;
 *   wake    bumped by a lane request leaving while someone closes: closers
 *           sleep on it (futex) instead of spinning while a request they wait
 *           for is off the CPU.
 * ts_dev_lane (one per open device): its directory, size and writability, also
 * set by Python with the gate closed; writable = 0 for a snapshot; size = 0 and
 * writable = 0 for a device destroyed since.
 */
#define TS_GATE_READER 1LL
#define TS_GATE_WRITER 0x1000000LL          /* 1 << 24 */
#define TS_GATE_SHARED 0x100000000LL        /* 1 << 32 */
#define TS_GATE_EXCLUSIVE 0x1000000000000LL /* 1 << 48 */

typedef struct ts_lane {
    uint64_t *pages; uint64_t n_pages;
    const uint32_t *page_ref; uint8_t *page_dirty; const uint8_t *page_loaded;
    uint32_t *chunk_ref; uint8_t *chunk_state; uint64_t n_chunks;
    const uint32_t *chunk_sums; uint64_t n_sums; const uint8_t *chunk_verified;
    const uint8_t *intent_bits; uint8_t *intent_hot; uint64_t n_bits;
    int64_t *cursor; int64_t *counters;
    int fd; unsigned intent_shift; unsigned chunk_shift;
    int open;
    int writes;
    int64_t budget;
    int wrote;
    int64_t gate;
    int closers;
    int excl_closers;
    uint32_t wake;
} ts_lane;

typedef struct ts_dev_lane {
    uint64_t *dir; uint64_t n_dir;
    uint64_t size;
    int writable;
} ts_dev_lane;

/*
 * Write buf[length] at offset of the device through the lane: when the lane is
 * open for writes, the device writable, the range inside it and the gate empty,
 * take the gate and do ts_write_fast with the lane's arrays, taking TS_SLOW also
 * when the write would allocate more chunks than budget or a map page in range
 * is not loaded (page_loaded[pid] == 0).  Returns what
 * ts_write_fast returns, or TS_SLOW with nothing changed; the caller then takes
 * the pool lock and the general path.
 */
int64_t ts_lane_write(ts_lane *lane, const ts_dev_lane *dev,
                      const uint8_t *buf, uint64_t offset, uint64_t length);

/*
 * Read [offset, offset+length) of the device into buf[length] through the lane
 * (ts_read_range), beside other readers, when the lane is open, the range
 * inside the device and spanning at most TS_FAST_MAX_CHUNKS chunks, every map
 * page it needs in memory, and no chunk in it waits for its checksum to be
 * checked (n_sums > 0, chunk_sums[c] != 0, not chunk_verified[c], not WRITTEN):
 * that is Python's to do.  Returns 0, -errno, TS_E_CORRUPT, or TS_SLOW with buf
 * untouched.
 */
int64_t ts_lane_read(ts_lane *lane, const ts_dev_lane *dev,
                     uint8_t *buf, uint64_t offset, uint64_t length);

/* A thread is about to take the pool lock's shared (exclusive = 0) or exclusive
 * side: from now on new lane writes (and, for the exclusive side, new lane
 * reads) stand aside, so that a thread waiting for the lock is not starved by
 * lane requests that never wait.  Each announce ends in ts_gate_close, or in
 * ts_gate_withdraw when the lock was not taken after all. */
void ts_gate_announce(ts_lane *lane, int exclusive);
void ts_gate_withdraw(ts_lane *lane, int exclusive);

/* The lock is taken: wait for the lane requests inside that this side excludes
 * to finish (each is one request), then count in; ends the announce. */
void ts_gate_close(ts_lane *lane, int exclusive);

/* Count that holder out again. */
void ts_gate_open(ts_lane *lane, int exclusive);

/* cdef-end */

#endif /* THINSTORE_NATIVE_H */
