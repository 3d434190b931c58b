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
 *   chunk_summary[(n_chunks + 4095) >> 12]  uint8  1 when some chunk of that window
 *                                 of 1 << TS_SUMMARY_SHIFT chunks has a state flag:
 *                                 every kernel that sets a flag sets its window's byte
 *                                 too, so SpaceMap.flagged() scans the summary and the
 *                                 flagged windows, never the whole state array
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
 *     After an I/O error in ts_write the map may be partially updated, as
 *     with the twin; the open transaction is then abandoned by the caller.
 */
#ifndef THINSTORE_NATIVE_H
#define THINSTORE_NATIVE_H

#include <stdint.h>

/* cdef-begin: everything up to cdef-end is parsed by cffi. */

/* Bumped whenever a signature or semantics here changes; native.py refuses a
 * build whose ts_api_version() differs from the one it was written for. */
#define TS_API_VERSION 16

#define TS_FANOUT 508

#define TS_ST_PENDING_FREE 1  /* ref fell to 0 in the open txn; not reusable until commit */
#define TS_ST_PINNED 2        /* ref fell but is nonzero in the open txn: copy on write  */
#define TS_ST_WRITTEN 4       /* data written since the last commit                      */
#define TS_ST_REF_CHANGED 8   /* refcount changed since the last commit                  */
#define TS_ST_REHASH 16       /* data written since DataSums.prehash cleared this flag:   *
                               * set after the write's bytes are in the file, on every    *
                               * chunk a write maps, when checksums are on (n_sums > 0)   */
#define TS_SUMMARY_SHIFT 12   /* chunk_summary: one byte per 4096 chunks                  */

#define TS_E_BASE 100000
#define TS_E_CORRUPT -100001    /* an id points outside its array, or a write hits a missing page */
#define TS_E_UNDERFLOW -100002  /* a reference count would drop below zero                 */
#define TS_E_NOCHUNK -100003    /* ts_write (TS_REQ_GIVEN) ran out of the new chunks given */
#define TS_E_SPACE -100004      /* the output array is too small                           */
#define TS_E_ARG -100005        /* bad argument: delta not +-1, shift out of range         */
#define TS_SLOW -100006         /* ts_write: not the common case; nothing was changed       */
#define TS_FAST_MAX_CHUNKS 64   /* checked ts_write requests span at most this many chunks  */

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
                   uint32_t *chunk_ref, uint8_t *chunk_state, uint8_t *chunk_summary,
                   uint64_t n_chunks);

/*
 * Apply delta (+1 or -1) to the reference count of each id in ids[k] (ids may
 * repeat and each occurrence counts; zeros are ignored).  Every id touched gets
 * REF_CHANGED; a decrement also sets, from the count after the whole batch,
 * PENDING_FREE when it is 0 and PINNED otherwise.  All or nothing: if any count
 * would drop below 0 (TS_E_UNDERFLOW) or an id is out of range (TS_E_CORRUPT)
 * nothing changes.  Returns 0 or the error.
 */
int ts_ref_batch(uint32_t *chunk_ref, uint8_t *chunk_state, uint8_t *chunk_summary,
                 uint64_t n_chunks, const uint64_t *ids, uint64_t k, int delta);

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

/*
 * Paced writeback: start and wait for the writeback of the dirty pages of the
 * byte ranges runs[2k], runs[2k+1] (offset, length; k < n_runs) of fd, at most
 * `window` bytes at a time (sync_file_range WAIT_BEFORE|WRITE|WAIT_AFTER per
 * window), so that no more than a window of it is ever queued at the disk ahead
 * of a durable write someone else makes meanwhile (the intent log's).  Moves
 * work only: durability still comes from an fsync.  Returns 0 or -errno.
 */
int ts_writeback(int fd, const int64_t *runs, uint64_t n_runs, uint64_t window);

/*
 * Data checksums of whole chunks (datasums.py chunk_sum, docs/format.md): for k < n,
 * out[k] = the low 32 bits of MurmurHash3 x64 128-bit (seed 0) of chunk ids[k]'s
 * chunk_size bytes at ids[k] * chunk_size in fd, or 1 where those bits are 0 (0 means
 * "unknown").  Consecutive ids are read together, up to 256 KiB at once, into a
 * buffer of its own: several threads may call it at once (cffi lets go of the GIL).
 * Bytes past the end of the file read as zeros.  Returns 0, -errno or TS_E_ARG.
 * ts_mmh3_x64_low32: the same hash of one buffer (what the tests compare to mmh3).
 */
int ts_hash_chunks(int fd, const int64_t *ids, uint64_t n, uint64_t chunk_size, uint32_t *out);
uint32_t ts_mmh3_x64_low32(const uint8_t *data, uint64_t len);

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
 * Clear `flags` from state[ids[k]] for k < n, each with one atomic and: a request
 * kernel may be setting other flags of the same chunks meanwhile (without the
 * pool lock: DataSums.prehash), and none of its flags may be lost.  An id at or
 * past n_state is skipped.
 */
void ts_state_clear(uint8_t *state, uint64_t n_state, const int64_t *ids, uint64_t n,
                    uint8_t flags);

/*
 * The pool's state, as every request kernel takes it: one struct per open pool,
 * owned by the pool (thinstore/fastlane.py: PoolKernelState), pointing into the
 * arrays Python owns.  Python re-points it whenever it replaces an array (the
 * map store grows, the space map or checksums resize) and only while no kernel
 * runs on it: under the pool lock's exclusive side, which closes the gate below.
 *
 *   pages[n_pages*FANOUT], page_ref[n_pages], page_dirty[n_pages],
 *   page_loaded[n_pages]       the map store (page_loaded: the row is in memory;
 *                              a row not read yet looks all holes)
 *   chunk_ref, chunk_state, chunk_summary, n_chunks   the space map
 *   chunk_sums[n_sums]         committed data checksums, n_sums = 0 when off
 *   chunk_verified[n_sums]     a read checked the chunk's checksum since it was
 *                              last written (NULL when checksums are off)
 *   intent_bits, intent_hot [n_bits], intent_shift   the write-intent bitmap:
 *                              region r = chunk >> intent_shift is durable-marked
 *                              (bits), and written in this transaction (hot)
 *   cursor[3]                  SpaceMap.cursor_arr: allocation cursor, and the
 *                              preallocated chunk range [cursor[1], cursor[2])
 *   counters[4]                chunks allocated, chunks copied on write, bytes
 *                              copied, bytes written (added to; Python folds them)
 *   fd, chunk_shift            the data file
 * and the lane's scalars, used only by TS_REQ_LANE requests (the locked modes
 * ignore them):
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
 * ts_dev (one per open device for the lane, one per device for the locked path): its
 * directory, size and writability; writable = 0 for a snapshot; size = 0 and
 * writable = 0 for a device destroyed since.
 */
#define TS_GATE_READER 1LL
#define TS_GATE_WRITER 0x1000000LL          /* 1 << 24 */
#define TS_GATE_SHARED 0x100000000LL        /* 1 << 32 */
#define TS_GATE_EXCLUSIVE 0x1000000000000LL /* 1 << 48 */

typedef struct ts_pool {
    uint64_t *pages; uint64_t n_pages;
    const uint32_t *page_ref; uint8_t *page_dirty; const uint8_t *page_loaded;
    uint32_t *chunk_ref; uint8_t *chunk_state; uint8_t *chunk_summary; uint64_t n_chunks;
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
} ts_pool;

typedef struct ts_dev {
    uint64_t *dir; uint64_t n_dir;
    uint64_t size;
    int writable;
} ts_dev;

/*
 * Count the chunks of [offset, offset+length) of dev a write would have to
 * allocate: entry 0 (or no page), or chunk_ref > 1, or state & PINNED.
 * Returns the count or TS_E_CORRUPT.
 */
int64_t ts_count_write_allocs(const ts_pool *pool, const ts_dev *dev,
                              uint64_t offset, uint64_t length);

/* How ts_write is called (mode): */
#define TS_REQ_GIVEN 0   /* the general path, under the pool lock: the caller made the
                          * pages exclusive and passes the new chunks; no checks      */
#define TS_REQ_LOCKED 1  /* the common case, under the pool lock: checked, allocating */
#define TS_REQ_LANE 2    /* the common case without the lock: TS_REQ_LOCKED behind the
                          * gate and the lane's scalars                              */

/*
 * The one write entry: buf[length] at byte offset of dev.
 *
 * Every mode ends in the same write.  Each chunk touched, with [lo, hi) the
 * part the write covers:
 *   entry 0   -> take the next new chunk; ref = 1, state = REF_CHANGED|WRITTEN; punch
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
 * Every flag set also sets the chunk's chunk_summary byte.  Data landing
 * contiguously in the file goes out in one pwrite.  counters[4] += (chunks
 * allocated (both cases above), chunks copied on write, bytes copied, bytes
 * written).
 *
 * TS_REQ_GIVEN: new_chunks[n_new] are the new chunks, in order; the page of
 *   every chunk in range must exist and be exclusive (the caller shadows).
 *   Returns 0, -errno on I/O error, TS_E_NOCHUNK, TS_E_CORRUPT or TS_E_UNDERFLOW.
 * TS_REQ_LOCKED (new_chunks ignored): the write applies when every chunk of the
 *   range lies under a loaded map page with page_ref == 1 (a hole in such a page
 *   is fine: a first write), the request spans at most TS_FAST_MAX_CHUNKS chunks
 *   and buf is not all zeros.  Then:
 *   - need = chunks that are holes or shared: each gets a new chunk;
 *   - need free chunks (chunk_ref == 0, not PENDING_FREE) are found scanning up
 *     from cursor[0] to n_chunks, then from 1 (at most 65536 ids are looked at);
 *     cursor[0] becomes the last id taken + 1 (1 past the end) -- the order and
 *     cursor rule of SpaceMap.allocate, so both pick the same chunks; then
 *     ts_prealloc for them;
 *   - write intent (n_sums > 0): a chunk with a committed checksum
 *     (chunk_sums[c] != 0) not WRITTEN since the commit gets
 *     intent_hot[c >> intent_shift] = 1; its region must already be marked
 *     durable (intent_bits[r] != 0, r < n_bits) -- DataSums.before_write's
 *     outcome when no intent I/O is needed;
 *   - then the write with the chunks found.
 *   Returns need (>= 0) when written; TS_SLOW, with nothing changed, when any
 *   condition fails (a shared, missing or unloaded page, too few free chunks
 *   within the scan, an unmarked intent region, an all-zero buffer, an id out of
 *   range): the caller then takes the general path, which does the same write.
 *   After the checks the errors are those of TS_REQ_GIVEN.  A new chunk it maps
 *   is not recorded as written-in-part (DataSums.fresh): the commit hashes it
 *   from a full read, as it does any chunk Python cannot vouch for.
 * TS_REQ_LANE: when the lane is open for writes, dev writable, the range inside
 *   it and the gate empty with no closer waiting, take the gate and do
 *   TS_REQ_LOCKED, taking TS_SLOW also when the write would allocate more chunks
 *   than budget; a result other than TS_SLOW sets wrote and takes the chunks
 *   allocated off budget.  Otherwise TS_SLOW with nothing changed; the caller
 *   then takes the pool lock and the general path.
 */
int64_t ts_write(ts_pool *pool, const ts_dev *dev, const uint8_t *buf, uint64_t offset,
                 uint64_t length, int mode, const int64_t *new_chunks, uint64_t n_new);

/*
 * The one read entry: [offset, offset+length) of dev into buf[length].
 * TS_REQ_LOCKED: under the pool lock (its shared side will do): ts_read_range
 *   over dev's directory and the pool's pages.  Returns 0, -errno or TS_E_CORRUPT.
 * TS_REQ_LANE: the same beside other readers without the lock, when the lane is
 *   open, the range inside the device and spanning at most TS_FAST_MAX_CHUNKS
 *   chunks, every map page it needs in memory, and no chunk in it waits for its
 *   checksum to be checked (n_sums > 0, chunk_sums[c] != 0, not chunk_verified[c],
 *   not WRITTEN): that is Python's to do.  Otherwise TS_SLOW with buf untouched.
 * (TS_REQ_GIVEN is not a read mode: TS_E_ARG.)
 */
int64_t ts_read(ts_pool *pool, const ts_dev *dev, uint8_t *buf, uint64_t offset,
                uint64_t length, int mode);

/*
 * ts_read TS_REQ_LANE that also says what the map holds for the range, read in
 * the same pass through the gate (for a structured NBD reply, which answers
 * unmapped runs as holes: nbd_fast.c): TS_RUNS_HOLE when no chunk of the range
 * has a map entry, TS_RUNS_DATA when every chunk has one, TS_RUNS_MIXED else;
 * TS_SLOW or an error as ts_read.
 */
#define TS_RUNS_HOLE 0
#define TS_RUNS_DATA 1
#define TS_RUNS_MIXED 2
int64_t ts_read_runs(ts_pool *pool, const ts_dev *dev, uint8_t *buf, uint64_t offset,
                     uint64_t length);

/*
 * Unmap whole virtual chunks [first, first+count) of dev: each nonzero entry
 * becomes 0, its chunk loses one reference with ref_batch -1 rules (one batch
 * for the whole range) and its page is marked dirty; chunks under a missing page
 * are skipped.  Pages with nonzero entries must be exclusive.  All or nothing.
 * Returns the number of entries unmapped, TS_E_CORRUPT or TS_E_UNDERFLOW.
 */
int64_t ts_unmap_range(ts_pool *pool, const ts_dev *dev, uint64_t first, uint64_t count);

/* A thread is about to take the pool lock's shared (exclusive = 0) or exclusive
 * side: from now on new lane writes (and, for the exclusive side, new lane
 * reads) stand aside, so that a thread waiting for the lock is not starved by
 * lane requests that never wait.  Each announce ends in ts_gate_close, or in
 * ts_gate_withdraw when the lock was not taken after all. */
void ts_gate_announce(ts_pool *pool, int exclusive);
void ts_gate_withdraw(ts_pool *pool, int exclusive);

/* The lock is taken: wait for the lane requests inside that this side excludes
 * to finish (each is one request), then count in; ends the announce. */
void ts_gate_close(ts_pool *pool, int exclusive);

/* Count that holder out again. */
void ts_gate_open(ts_pool *pool, int exclusive);

/*
 * The intent log (intentlog.c; thinstore/synclog.py, docs/format.md "Intent log").
 *
 * ts_mmh3: MurmurHash3 x86 32-bit of data[len] with seed: the metadata checksum
 * (format.checksum, which computes it with the mmh3 package).
 *
 * ts_log_record: an intent-log record built whole in out[out_len] (the layout of
 * docs/format.md "Intent log"; format.finish_log_record is the twin).  The caller
 * has packed the first 64 bytes (the header: magic, version, flags, sequence and
 * base; n_entries, length and checksum are filled here).  Entry k is range
 * ranges[k][3] = (i, offset, length) of device devs[i], id dev_ids[i]; its present
 * bytes are read through the device's directory and the pool's pages (ts_read_range;
 * call with the pool lock's shared side held) and follow the entry table in order,
 * except a range that reads as all zeros, which becomes a ZERO entry and takes no
 * room.  Then zeros to a multiple of 512 bytes, the length and the checksum.
 * Returns the record's length; TS_SLOW with nothing promised when a range is empty
 * or outside its device, out is too small or a map page it needs is not in memory
 * (the caller builds it in Python); -errno or TS_E_CORRUPT.
 */
uint32_t ts_mmh3(const uint8_t *data, uint64_t len, uint32_t seed);
int64_t ts_log_record(const ts_pool *pool, const ts_dev *const *devs, const uint64_t *dev_ids,
                      const uint64_t *ranges, uint64_t n, uint8_t *out, uint64_t out_len);

/*
 * The intent log's writer thread (intentlog.c; synclog.py uses it when the log file
 * has a descriptor).  A ticket is the log's count of bytes appended, after a record.
 *   ts_syncer_new(fd, dio_fd)  a writer over the log (fd) and the same file opened
 *                         O_DIRECT|O_DSYNC (dio_fd, or -1): with dio_fd and a Linux
 *                         AIO context, no thread (appends submit direct writes, waits
 *                         reap them); else a writer thread (direct writes, or
 *                         buffered ones and fdatasync).  THINSTORE_LOG_THREAD=1 forces
 *                         the thread.  A direct write refused with EINVAL is redone
 *                         buffered with a fdatasync.  NULL with errno set on failure.
 *   ts_syncer_append(s, rec, len, off, ticket)  queue a copy of rec[len] for file
 *                         offset off (both multiples of 512), the record whose
 *                         ticket is `ticket`.  0, -ENOMEM, -EBADF after stop.
 *   ts_syncer_kick(s, t)  ask for every record up to ticket t; returns at once.
 *   ts_syncer_wait(s, t)  kick, then wait: returns the durable count (>= t), or
 *                         -errno of the attempt that should have made t durable
 *                         (its records stay queued; a later kick retries), or
 *                         -EBADF once stopped.
 *   ts_syncer_discard(s, t)  after a full commit: wait for any write in flight,
 *                         drop what is queued and count every ticket up to t
 *                         durable; on return no record write is under way (the
 *                         log may be truncated).
 *   ts_syncer_stats(s, out[4])  durable count, successful attempts, attempts
 *                         begun, attempts made durable by direct writes alone.
 *   ts_syncer_stop(s)     stop and join the thread (call it before the files are
 *                         closed); idempotent; the struct stays valid.
 *   ts_syncer_free(s)     stop, then free: only when no thread can still use s.
 */
typedef struct ts_syncer ts_syncer;
ts_syncer *ts_syncer_new(int fd, int dio_fd);
int ts_syncer_append(ts_syncer *s, const uint8_t *rec, uint64_t len, uint64_t off,
                     uint64_t ticket);
void ts_syncer_kick(ts_syncer *s, uint64_t ticket);
int64_t ts_syncer_wait(ts_syncer *s, uint64_t ticket);
void ts_syncer_discard(ts_syncer *s, uint64_t ticket);
void ts_syncer_stats(ts_syncer *s, uint64_t *out);
void ts_syncer_stop(ts_syncer *s);
void ts_syncer_free(ts_syncer *s);

/*
 * The log's append cursor (intentlog.c), shared by synclog.py and the native NBD
 * loop (nbd_fast.h), so that a connection's loop can append a record of its own
 * writes and answer a FLUSH or FUA write without returning to Python.
 *   syncer      the log writer every record goes through
 *   mu          the append mutex (an opaque pthread mutex: ts_log_lock/unlock):
 *               one record built and appended at a time, in sequence order
 *   pending     writes noted and not yet in an appended record (atomic: Python
 *               adds its own notes with ts_log_pending, the loop its own as it
 *               makes them; an append takes its notes off after `appended` grew)
 *   appended    bytes appended ever (a record's ticket is this after it); under mu
 *   tail, sequence  where the next record goes and its number in the epoch; under mu
 *   room        a record appended in C must end at or before this (synclog.py keeps
 *               it at min(extent - 2 GROW_STEP, MAX_BYTES)); 0: C appends nothing
 *   max_batch   bytes of data one record may carry
 *   head[64]    the header of the epoch's records with sequence 0 (magic, version,
 *               base), packed by synclog.py whenever the base changes
 *   records, record_bytes  the records the loop appended (counters)
 * ts_log_own(l, p, dev, dev_id, notes, n, scratch, len, &ticket): under the gate
 * (a lane read's side: no write runs) and mu, when the only writes pending are
 * the n (offset, length) pairs of notes[2n] on dev (id dev_id), append one record
 * of them (built in scratch[len], ts_log_record) and start its write; with n = 0,
 * only check that nothing is pending.  1 with *ticket set (durable once
 * ts_syncer_wait(ticket) says so: every write noted so far is in a record up to
 * it), 0 when Python must do it (others' writes pending, the gate closed, no
 * room, a record too large or not buildable in C); never an error: Python's
 * path then meets the same one and reports it.
 */
typedef struct ts_log {
    ts_syncer *syncer;
    void *mu;
    int64_t pending;
    uint64_t appended, tail, sequence, room, max_batch;
    uint8_t head[64];
    uint64_t records, record_bytes;
} ts_log;
ts_log *ts_log_new(ts_syncer *s);
void ts_log_free(ts_log *l);
void ts_log_lock(ts_log *l);
void ts_log_unlock(ts_log *l);
void ts_log_pending(ts_log *l, int64_t delta);
int ts_log_own(ts_log *l, ts_pool *p, const ts_dev *dev, uint64_t dev_id,
               const uint64_t *notes, uint64_t n, uint8_t *scratch, uint64_t scratch_len,
               uint64_t *ticket);

/* cdef-end */

/*
 * C callers only (intentlog.c): enter the gate as a lane read does -- 1 when
 * inside (the lane open, no lane write or exclusive holder, no exclusive closer
 * waiting), 0 when it must stand aside; leave it after a 1.
 */
int ts_gate_enter_reader(ts_pool *l);
void ts_gate_leave_reader(ts_pool *l);

#endif /* THINSTORE_NATIVE_H */
