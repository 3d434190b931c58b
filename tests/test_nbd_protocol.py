"""The wire layer alone: encoders and decoders of thinstore.nbd.protocol."""

from __future__ import annotations

import errno

import pytest

from thinstore.nbd import protocol as P


def test_message_sizes_match_the_spec():
    assert P.GREETING.size == 18 and P.OPTION_HEADER.size == 16 and P.OPTION_REPLY.size == 20
    assert P.REQUEST.size == 28 and P.SIMPLE_REPLY.size == 16 and P.STRUCTURED_HEADER.size == 20
    assert len(P.export_name_reply(1, 1, no_zeroes=False)) == 10 + 124
    assert len(P.export_name_reply(1, 1, no_zeroes=True)) == 10


def test_info_request_round_trip():
    data = P.U32.pack(3) + b"vol" + P.U16.pack(2) + P.U16.pack(1) + P.U16.pack(3)
    assert P.decode_info_request(data) == P.InfoRequest("vol", (1, 3))


@pytest.mark.parametrize("data,reply", [
    (b"", P.Rep.ERR_INVALID),
    (P.U32.pack(5000) + b"v" * 5000 + P.U16.pack(0), P.Rep.ERR_TOO_BIG),
    (P.U32.pack(1) + b"v" + P.U16.pack(1), P.Rep.ERR_INVALID),
    (P.U32.pack(1) + b"v" + P.U16.pack(0) + b"extra", P.Rep.ERR_INVALID),
])
def test_info_request_errors(data, reply):
    with pytest.raises(P.OptionError) as caught:
        P.decode_info_request(data)
    assert caught.value.reply == reply


def test_meta_context_request_and_matching():
    data = P.U32.pack(1) + b"v" + P.U32.pack(2) + P.U32.pack(5) + b"base:" + P.U32.pack(3) + b"x:y"
    request = P.decode_meta_context_request(data)
    assert request == P.MetaContextRequest("v", ("base:", "x:y"))
    assert P.match_meta_contexts(request.queries, listing=True) == [P.BASE_ALLOCATION]
    assert P.match_meta_contexts(request.queries, listing=False) == []
    assert P.match_meta_contexts((), listing=True) == [P.BASE_ALLOCATION]
    assert P.match_meta_contexts((), listing=False) == []


def test_host_errnos_map_to_the_wire_set():
    assert P.wire_errno(errno.EPERM) == P.EPERM
    assert P.wire_errno(errno.EDQUOT) == P.ENOSPC
    assert P.wire_errno(errno.ENOENT) == P.EIO
    assert P.wire_errno(None) == P.EIO


def test_structured_chunks():
    chunk = P.chunk_block_status(7, 1, [(4096, 3), (8192, 0)])
    magic, flags, kind, cookie, length = P.STRUCTURED_HEADER.unpack(chunk[:20])
    assert (magic, flags, kind, cookie, length) == (P.STRUCTURED_REPLY_MAGIC, 1,
                                                    P.REPLY_TYPE_BLOCK_STATUS, 7, 20)
    error = P.chunk_error(9, P.EINVAL, "bad")
    assert P.ERROR_CHUNK.unpack(error[:26])[4:] == (9, P.EINVAL, 3) and error.endswith(b"bad")
    hole = P.chunk_offset_hole(5, 4096, 512, done=False)
    assert P.OFFSET_HOLE.unpack(hole)[1:] == (0, P.REPLY_TYPE_OFFSET_HOLE, 5, 12, 4096, 512)
