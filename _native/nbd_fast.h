/*
 * nbd_fast.h -- the NBD server's native request loop (thinstore/nbd/burst.py).
 *
 * One NBD connection's hot path in C: the plain READs and WRITEs that the
 * Python reader would serve on its fast path (thinstore/nbd/transmission.py,
 * _fast_path) are parsed from the connection's input buffer, run through the
 * lane (ts_write / ts_read in mode TS_REQ_LANE, thinstore_native.h) and
 * answered into an output buffer, many requests per call and without the GIL.
 * Anything else is left to Python, which handles it exactly as it would have
 * without this loop: the loop is an accelerator, never the only way.
 *
 * _native/build.py feeds the block between the cdef markers to cffi after
 * thinstore_native.h's (same extension module, same TS_API_VERSION).
 *
 * Wire formats (doc/proto.md of the NBD project, "Transmission phase"; all
 * big-endian): request header 28 bytes (magic 0x25609513 u32, flags u16,
 * type u16, cookie u64, offset u64, length u32), then a WRITE's payload;
 * simple reply 16 bytes (magic 0x67446698, error u32 = 0, cookie u64), then a
 * READ's data; structured reply chunks (magic 0x668E33EF u32, flags u16 =
 * DONE, type u16, cookie u64, length u32): OFFSET_DATA (type 1, length 8 +
 * data: offset u64 then the data; 28 bytes before the data) and OFFSET_HOLE
 * (type 2, length 12: offset u64, size u32; 32 bytes in all).
 */
#ifndef THINSTORE_NBD_FAST_H
#define THINSTORE_NBD_FAST_H

#include "thinstore_native.h"

/* cdef-begin: everything up to cdef-end is parsed by cffi. */

#define TS_NBD_FAST_MAX 131072   /* largest READ/WRITE served (held.py FAST_MAX)      */
#define TS_NBD_HEADER 28         /* request header bytes                              */
#define TS_NBD_NOTES_MAX 64      /* writes recorded per call: the call stops at this   */
#define TS_NBD_HELD_MAX 64       /* FLUSH and FUA replies the loop holds at once        */
#define TS_NBD_ROUNDS 32         /* with may_send: waits for a request one call makes    */

/* Why ts_nbd_burst returned (the request at ibuf[start] is unconsumed in each case): */
#define TS_NBD_IDLE 0    /* no whole request header is buffered and may_block was 0 */
#define TS_NBD_FULL 1    /* the output buffer reached out_flush bytes or max_replies
                          * replies, or the next reply does not fit in it            */
#define TS_NBD_OTHER 2   /* the next request is not one this loop serves, or the lane
                          * stood aside (TS_SLOW) or failed (err): Python's path     */
#define TS_NBD_CLOSED 3  /* recv saw the end of the stream or an error (err): Python's
                          * own read will report it                                  */
#define TS_NBD_TAKEN 4   /* a large WRITE was received (header consumed, payload in
                          * big, or big2 when taken_which is 1) but the lane stood
                          * aside or failed: Python does it (taken_cookie,
                          * taken_offset, taken_length)                              */
#define TS_NBD_SEND 5    /* a pipelined large WRITE is done (its reply in obuf) and
                          * the next is with the writer: Python sends the replies
                          * and calls again (or ts_nbd_drain)                        */
#define TS_NBD_FUA 6     /* (with fua set) a WRITE flagged FUA, up to
                          * TS_NBD_FAST_MAX, was written through the lane and noted
                          * like any other, but has no reply in obuf: Python holds
                          * its reply until a flush (fua_cookie, fua_offset,
                          * fua_length)                                              */
#define TS_NBD_SYNC 7    /* (with log) the record for the held FLUSH and FUA requests
                          * is on its way (ticket): Python sends the replies in obuf,
                          * then calls ts_nbd_settle                                 */

/*
 * One connection, set up and kept in step by Python (thinstore/nbd/burst.py):
 *   pool, dev        the lane's structs for the exported device (fastlane.py)
 *   fd               the connection's socket (plain, blocking; never TLS); the
 *                    loop only receives from it, it never sends
 *   structured       1 when structured replies were negotiated
 *   writable         0 when WRITEs must get Python's answer (a read-only export)
 *   ibuf[in_size], start, end  the connection's input buffer (channel.Inbox's
 *                    bytearray and its cursors): bytes [start, end) are received
 *                    and unconsumed.  The loop consumes whole requests and
 *                    receives into it, moving [start, end) to the front first
 *                    (as Inbox._fill does); in_size >= 28 + TS_NBD_FAST_MAX.
 *   obuf[out_size], out_len  replies are appended at obuf[out_len]; Python sends
 *                    them in order and resets out_len (and replies) once sent
 *   out_flush, max_replies   stop (TS_NBD_FULL) once out_len >= out_flush or
 *                    replies >= max_replies (the channel.Outbox's flush points)
 *   replies          replies in obuf since Python last reset it
 *   stat[6]          this call's served READs: ops, bytes, ns; WRITEs: ops,
 *                    bytes, ns (zeroed at the start of each call; every served
 *                    request is timed, CLOCK_MONOTONIC, from its header and
 *                    payload being in to its reply being in obuf)
 *   notes[2 * n]     (offset, length) of each WRITE served in this call, n =
 *                    stat[3]: Python adds them to the intent log's notes before
 *                    it sends any reply of the call (the crash contract)
 *   large_max        READs and WRITEs above TS_NBD_FAST_MAX and up to this are
 *                    served too (0: none); a WRITE's payload goes to
 *   big[big_size]    (big_size >= large_max), received whole before the lane
 *                    writes it; taken_* name one Python must do (TS_NBD_TAKEN)
 *   big2             NULL, or a second buffer of big_size bytes: then large
 *                    WRITEs are pipelined (below), their payloads alternating
 *                    between big and big2
 *   pipe             the loop's own (NULL at first; ts_nbd_close frees it)
 *   lost             the length of a WRITE whose header this call consumed and
 *                    whose payload the stream ended in (TS_NBD_CLOSED), else 0:
 *                    Python counts it as asked for, as its own reader does
 *   err              the lane's or recv's error behind TS_NBD_OTHER/CLOSED, or 0
 *   fua              1: WRITEs flagged FUA (only that flag) are served too, as
 *                    TS_NBD_FUA says; 0: they are Python's (TS_NBD_OTHER)
 *   fua_*            the FUA WRITE behind TS_NBD_FUA
 *
 * Pipelined large WRITEs: with big2, a large WRITE whose payload is in is
 * handed to a writer thread of the connection (started at the first one) and
 * the loop goes on receiving the next request while the lane writes it, so the
 * copy out of the socket overlaps the copy into the data file.  At most one
 * WRITE is in the writer's hands, and only while the loop receives the next
 * request header and, when that is a large WRITE too, its payload; any other
 * request waits for it first.  Its reply and its note are made when it is
 * done, as for any other WRITE, and the loop then returns TS_NBD_SEND so that
 * the reply goes out while the writer writes the next: that is the only return
 * with a write in the writer's hands, and Python calls ts_nbd_burst again (or,
 * giving up on the connection, ts_nbd_drain) before it does anything else.
 * Python sees the same replies, notes and TAKENs in the same order as without
 * the pipeline.
 */
typedef struct ts_nbd_conn {
    ts_pool *pool; ts_dev *dev;
    int fd; int structured; int writable;
    uint8_t *ibuf; uint64_t in_size; uint64_t start; uint64_t end;
    uint8_t *obuf; uint64_t out_size; uint64_t out_len; uint64_t out_flush;
    uint32_t replies; uint32_t max_replies;
    int64_t stat[6];
    uint64_t notes[128];
    uint64_t large_max; uint8_t *big; uint64_t big_size;
    uint64_t taken_cookie; uint64_t taken_offset; uint64_t taken_length;
    int64_t err;
    uint8_t *big2; int taken_which;
    void *pipe;
    uint64_t lost;
    int fua;
    uint64_t fua_cookie; uint64_t fua_offset; uint64_t fua_length;
    /* the durable path (below) */
    ts_log *log; uint64_t dev_id;
    uint8_t *scratch; uint64_t scratch_size;
    uint32_t n_notes;
    uint32_t n_held;
    uint64_t held_cookie[64]; uint64_t held_offset[64]; uint32_t held_length[64];
    uint64_t ticket;
    uint64_t early;
    int64_t since; int64_t gap; int64_t guess; int64_t score; int started;
    uint64_t mark;
    int64_t flush_stat[2];
    int may_send; int send_failed;
} ts_nbd_conn;

/*
 * The durable path (with log, the pool's intent-log cursor, and fua set): the loop
 * answers FLUSH and FUA WRITEs itself, as thinstore/nbd/held.py does in Python, when
 * the only writes pending in the whole pool are its own:
 *   log, dev_id     the cursor (ts_log) and the exported device's id; NULL: off
 *   scratch[scratch_size]  where the loop builds its records
 *   n_notes         the notes in notes[] (stat[3] counts the call's WRITEs; a note
 *                   the loop put in a record of its own leaves notes[])
 *   held_*[n_held]  FLUSH (length 0) and FUA WRITE requests held: each answered
 *                   once a record holding every write noted before it is durable
 *   ticket          the ticket of that record (TS_NBD_SYNC)
 *   since, gap, guess, score, started   the early flush's state, shared with
 *                   held.py (its docstring): writes since the last FLUSH or FUA,
 *                   the gap before, the write count a FLUSH is expected at, how
 *                   such guesses did, whether the early record of those writes was
 *                   appended here
 *   early           that early record's ticket, within one call: once the loop
 *                   has sent the write's reply itself (may_send) with nothing
 *                   buffered, it waits for the record before the socket (the
 *                   FLUSH it was started for finds it durable)
 *   mark            where the call's replies not yet sent begin in obuf (its
 *                   length when the call began, 0 after the loop sent them)
 *   flush_stat[2]   this call's answered FLUSHes: count and ns (held to answered)
 *   may_send        Python's word that nobody else can send on the connection
 *                   during this call (its send queue empty, nothing held, no
 *                   worker in flight): then, where the loop would return
 *                   TS_NBD_IDLE with every write it served in a record of its
 *                   own (none left in notes) and nothing held, it sends the
 *                   call's replies itself (blocking, MSG_NOSIGNAL) and goes on
 *                   waiting for the next request, as Python would after settling,
 *                   up to TS_NBD_ROUNDS times a call; TS_NBD_SYNC is then not
 *                   returned either (sent, waited, answered, sent)
 *   send_failed     errno of a send that failed (the call returns TS_NBD_CLOSED):
 *                   Python treats the peer as gone, as its own send would
 * A plain FLUSH (flags, offset and length 0) and a FUA WRITE (served as above) are
 * held; once no whole request is buffered (the loop would return TS_NBD_IDLE) the
 * loop appends one record of its notes (ts_log_own) and, with no other reply of the
 * call in obuf, waits for it and answers every held request (simple replies) before
 * it returns; with other replies it returns TS_NBD_SYNC first.  With nothing held,
 * when the client's pattern says a FLUSH comes next (since == gap, score >= 0),
 * the record is appended at that point, before the write's reply goes out.  Where
 * ts_log_own or the wait says Python must (other writes pending, an error), the
 * call returns with the requests still in held_*: Python holds them (held.py) and
 * its flush does the rest, including reporting any error.  Any return may leave
 * requests in held_*; Python takes them over before it calls again.
 */

/*
 * Serve requests from c->ibuf until one of the stops above.  A request is served
 * when magic is right, flags 0 (or, with fua, a WRITE flagged FUA alone, up to
 * TS_NBD_FAST_MAX), type READ (0) or WRITE (1), 0 < length <=
 * max(TS_NBD_FAST_MAX, large_max), offset + length <= dev->size, and for a
 * WRITE writable; then a WRITE's payload (received to the end, blocking, when
 * only part of it is buffered: the client sends it at once) goes through
 * ts_write TS_REQ_LANE and a READ's data into obuf through ts_read TS_REQ_LANE
 * (ts_read_runs above TS_NBD_FAST_MAX).  If the lane answers TS_SLOW or an
 * error the request stays unconsumed (TS_NBD_OTHER) -- except a large WRITE,
 * whose payload is already out of the socket (TS_NBD_TAKEN); Python then does
 * it on its own path (so a failing request is tried again there, and answered
 * with its error).  Replies: WRITE a simple reply; READ a simple reply and the
 * data, or with structured replies one chunk flagged DONE: up to
 * TS_NBD_FAST_MAX, OFFSET_HOLE when the data read is all zeros, else
 * OFFSET_DATA; above, OFFSET_HOLE when no chunk of the range is mapped,
 * OFFSET_DATA when all are (a range with both is left to Python, which sends a
 * chunk per run) -- byte for byte what transmission.py sends for the same
 * request.
 * may_block: Python has settled (sent its replies, answered what it held) since
 * the last request was consumed; only then may the loop block for a request
 * header, and only until the first request of the call is consumed.
 * Returns one of TS_NBD_*.
 */
int ts_nbd_burst(ts_nbd_conn *c, int may_block);

/*
 * Wait for the write c's writer has (after TS_NBD_SEND): -1 when there is none
 * or it is done (its reply in obuf, its note and counts in notes and stat, as
 * from a ts_nbd_burst call), TS_NBD_TAKEN when the lane did not write it.
 */
int ts_nbd_drain(ts_nbd_conn *c);

/*
 * After TS_NBD_SYNC, once Python sent the call's replies: wait for c->ticket and
 * answer the held requests into obuf (counted in flush_stat; stat zeroed); -1, or
 * TS_NBD_IDLE with the requests still held when the record could not be made
 * durable (Python takes them over).
 */
int ts_nbd_settle(ts_nbd_conn *c);

/*
 * Stop and free c's writer thread, if it has one (after ts_nbd_burst or
 * ts_nbd_drain: a write it still had would be waited for and dropped).  Call
 * once, when the connection ends, before the pool and device structs go away;
 * c may be used again afterwards (a new writer starts when needed).
 */
void ts_nbd_close(ts_nbd_conn *c);

/* cdef-end */

#endif /* THINSTORE_NBD_FAST_H */
