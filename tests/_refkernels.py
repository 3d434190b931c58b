"""TEMPORARY plain-Python oracle of kernels.md, used until thinstore.kernels lands."""
import numpy as np

F = 508
PF, PIN, WR, RC = 1, 2, 4, 8


def _entry(dirarr, pages, v):
    pid = int(dirarr[v // F])
    return 0 if pid == 0 else int(pages[pid, v % F])


def translate(dirarr, pages, chunk_shift, offset, length, out):
    rows = []
    cs = 1 << chunk_shift
    pos, end = offset, offset + length
    while pos < end:
        v = pos >> chunk_shift
        stop = min((v + 1) * cs, end)
        c = _entry(dirarr, pages, v)
        d = (c << chunk_shift) + pos - v * cs if c else -1
        if rows and ((d < 0 and rows[-1][2] < 0) or (d >= 0 and rows[-1][2] >= 0 and rows[-1][2] + rows[-1][1] == d)):
            rows[-1][1] += stop - pos
        else:
            rows.append([pos, stop - pos, d])
        pos = stop
    for i, r in enumerate(rows):
        out[i] = r
    return len(rows)


def shadow_page(pages, src, dst, chunk_ref, chunk_state):
    pages[dst] = pages[src]
    for c in pages[dst]:
        if c:
            chunk_ref[c] += 1
            chunk_state[c] |= RC


def ref_batch(chunk_ref, chunk_state, ids, delta):
    for c in ids:
        if not c:
            continue
        if delta < 0:
            if chunk_ref[c] == 0:
                raise ValueError("underflow")
            chunk_ref[c] -= 1
            chunk_state[c] |= RC | (PF if chunk_ref[c] == 0 else PIN)
        else:
            chunk_ref[c] += 1
            chunk_state[c] |= RC


def count_write_allocs(dirarr, pages, chunk_ref, chunk_state, chunk_shift, offset, length):
    if length == 0:
        return 0
    n = 0
    for v in range(offset >> chunk_shift, ((offset + length - 1) >> chunk_shift) + 1):
        c = _entry(dirarr, pages, v)
        n += c == 0 or chunk_ref[c] > 1 or bool(chunk_state[c] & PIN)
    return n


def write_range(dirarr, pages, page_dirty, chunk_ref, chunk_state, new_chunks, chunk_shift, fio,
                buf, offset, length, counters):
    cs = 1 << chunk_shift
    mv = memoryview(buf).cast("B")
    pos, end, k = offset, offset + length, 0
    while pos < end:
        v = pos >> chunk_shift
        base = v * cs
        lo, hi = pos - base, min(base + cs, end) - base
        pid = int(dirarr[v // F])
        c = int(pages[pid, v % F])
        if c == 0 or chunk_ref[c] > 1 or chunk_state[c] & PIN:
            n = int(new_chunks[k]); k += 1
            if c == 0:
                fio.punch(n * cs, lo); fio.punch(n * cs + hi, cs - hi)
                counters[0] += 1
            else:
                fio.copy(c * cs, n * cs, lo); fio.copy(c * cs + hi, n * cs + hi, cs - hi)
                ref_batch(chunk_ref, chunk_state, np.array([c], np.uint64), -1)
                counters[1] += 1; counters[2] += lo + cs - hi
            chunk_ref[n] = 1
            chunk_state[n] |= RC | WR
            pages[pid, v % F] = n
            page_dirty[pid] = 1
            c = n
        else:
            chunk_state[c] |= WR
        fio.pwrite(mv[pos - offset:pos - offset + hi - lo], c * cs + lo)
        pos = base + hi
    counters[3] += length


def unmap_range(dirarr, pages, page_dirty, chunk_ref, chunk_state, first_chunk, n_chunks):
    n = 0
    for v in range(first_chunk, first_chunk + n_chunks):
        pid = int(dirarr[v // F])
        if pid and pages[pid, v % F]:
            ref_batch(chunk_ref, chunk_state, np.array([pages[pid, v % F]], np.uint64), -1)
            pages[pid, v % F] = 0
            page_dirty[pid] = 1
            n += 1
    return n


def read_range(dirarr, pages, chunk_shift, fio, buf, offset, length):
    out = np.zeros(length // (1 << chunk_shift) + 2, dtype=[("v", "i8"), ("l", "i8"), ("d", "i8")])
    o = np.zeros((length // (1 << chunk_shift) + 3, 3), np.int64)
    n = translate(dirarr, pages, chunk_shift, offset, length, o)
    mv = memoryview(buf).cast("B")
    for v, ln, d in o[:n]:
        s = v - offset
        mv[s:s + ln] = bytes(ln) if d < 0 else fio.pread(int(ln), int(d))


def cow_copy(fio, src_off, dst_off, length):
    fio.copy(src_off, dst_off, length)


def is_zero(buf):
    return not any(memoryview(buf).cast("B"))


def count_mapped(dirarr, pages, chunk_ref, page_ref):
    used = excl = 0
    for pid in dirarr:
        if pid:
            for c in pages[pid]:
                if c:
                    used += 1
                    excl += page_ref[pid] == 1 and chunk_ref[c] == 1
    return used, excl
