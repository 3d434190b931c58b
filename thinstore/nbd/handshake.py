"""The fixed newstyle handshake: option haggling up to the transmission phase.

One :class:`Negotiation` per connection.  It answers every option with the
reply the spec asks for, never allocates more than ``MAX_OPTION`` bytes for a
client-declared length, and returns an :class:`Agreement` when the client
enters transmission (GO or EXPORT_NAME), or ``None`` when the session ends.

State that TLS protects (structured replies, meta contexts) is forgotten when
STARTTLS succeeds, so a man in the middle cannot have negotiated it for us.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field

from thinstore.errors import ThinstoreError
from thinstore.nbd import protocol as P
from thinstore.nbd.wire import recv_exact, skip

log = logging.getLogger(__name__)

MAX_OPTION = 64 << 10          # option payloads we read and parse
MAX_SKIP = 1 << 20             # larger payloads skipped (ERR_TOO_BIG) up to this


class HardDisconnect(Exception):
    """The spec says to drop the connection (no reply is possible)."""


@dataclass
class Agreement:
    """What the handshake settled: the transmission phase runs on this."""

    sock: socket.socket
    device: object
    structured: bool
    contexts: dict[int, str] = field(default_factory=dict)
    tls: bool = False
    catalog: object = None


class Negotiation:
    """Option haggling for one connection; :meth:`run` drives it."""

    def __init__(self, sock: socket.socket, catalog, config):
        self.sock, self.catalog, self.config = sock, catalog, config
        self.deadline = time.monotonic() + config.handshake_timeout
        self.tls = False
        self.no_zeroes = False
        self._forget()

    def _forget(self) -> None:
        self.structured = False
        self.meta_export: str | None = None
        self.meta_contexts: list[str] = []

    # -- I/O -----------------------------------------------------------------
    def _recv(self, n: int) -> bytearray:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise HardDisconnect("handshake timed out")
        self.sock.settimeout(left)
        return recv_exact(self.sock, n)

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.sock.sendall(P.option_reply(option, reply, data))

    def _error(self, option: int, reply: int, message: str) -> None:
        self._reply(option, reply, message.encode()[:P.MAX_STRING])

    # -- phases --------------------------------------------------------------
    def run(self) -> Agreement | None:
        """Greet, read client flags, then answer options until GO/EXPORT_NAME/ABORT."""
        self.sock.sendall(P.greeting())
        (flags,) = P.CLIENT_FLAGS.unpack(self._recv(4))
        if flags & ~P.KNOWN_CLIENT_FLAGS:
            raise HardDisconnect(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & P.CLIENT_FLAG_NO_ZEROES)
        if self.config.tls_require and not flags & P.CLIENT_FLAG_FIXED_NEWSTYLE:
            raise HardDisconnect("TLS required but the client is not fixed newstyle")
        for _ in range(self.config.max_options):
            outcome = self._one_option()
            if outcome is not None:
                return outcome or None
        raise HardDisconnect("too many options")

    def _one_option(self):
        """Handle one option; an Agreement ends the handshake, False ends the session."""
        header = P.OptionHeader._make(P.OPTION_HEADER.unpack(self._recv(16)))
        if header.magic != P.IHAVEOPT:
            raise HardDisconnect("bad option magic")
        data = self._payload(header)
        if data is None:
            return None
        try:
            return self._dispatch(header.option, bytes(data))
        except P.OptionError as exc:
            if header.option == P.Opt.EXPORT_NAME:
                raise HardDisconnect(str(exc)) from None
            self._error(header.option, exc.reply, str(exc))
            return None

    def _payload(self, header: P.OptionHeader) -> bytearray | None:
        """Read the option's data, or skip an oversized one and answer TOO_BIG."""
        if header.length <= MAX_OPTION:
            return self._recv(header.length)
        if header.length > MAX_SKIP or header.option == P.Opt.EXPORT_NAME:
            raise HardDisconnect(f"option length {header.length} refused")
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        skip(self.sock, header.length)
        self._error(header.option, P.Rep.ERR_TOO_BIG, "option data too long")
        return None

    def _dispatch(self, option: int, data: bytes):
        if option == P.Opt.ABORT:
            self._reply(option, P.Rep.ACK)
            return False
        if option == P.Opt.STARTTLS:
            return self._starttls(data)
        if self.config.tls_require and not self.tls:
            if option == P.Opt.EXPORT_NAME:
                raise HardDisconnect("EXPORT_NAME before STARTTLS on a TLS-only server")
            raise P.OptionError(P.Rep.ERR_TLS_REQD, "this server requires TLS: use STARTTLS")
        handler = _HANDLERS.get(option)
        if handler is None:
            raise P.OptionError(P.Rep.ERR_UNSUP, f"option {option} is not supported")
        return handler(self, option, data)

    # -- option handlers -------------------------------------------------------
    def _export_name(self, option: int, data: bytes):
        try:
            name = P.decode_export_name(data)
            device = self.catalog.open(name)
        except (P.OptionError, ThinstoreError) as exc:
            raise HardDisconnect(f"EXPORT_NAME refused: {exc}") from None
        self._clear_contexts_unless(name)
        flags = self.catalog.transmission_flags(device, self.structured)
        try:
            self.sock.sendall(P.export_name_reply(device.size, flags, self.no_zeroes))
        except BaseException:
            device.close()
            raise
        return self._agree(device)

    def _info_or_go(self, option: int, data: bytes):
        request = P.decode_info_request(data)
        name = request.name
        try:
            info = self.catalog.describe(name)
        except ThinstoreError as exc:
            raise P.OptionError(P.Rep.ERR_UNKNOWN, f"no export {name!r}: {exc}") from None
        if option == P.Opt.INFO:
            self._send_info(option, request, info, info)
            return None
        try:
            device = self.catalog.open(name)
        except ThinstoreError as exc:
            raise P.OptionError(P.Rep.ERR_UNKNOWN, f"cannot open {name!r}: {exc}") from None
        try:
            self._send_info(option, request, info, device)
        except BaseException:
            device.close()
            raise
        self._clear_contexts_unless(name)
        return self._agree(device)

    def _send_info(self, option: int, request, info, target) -> None:
        flags = self.catalog.transmission_flags(target, self.structured)
        for payload in self._info_payloads(request, info, target.size, flags):
            self._reply(option, P.Rep.INFO, payload)
        self._reply(option, P.Rep.ACK)

    def _info_payloads(self, request, info, size, flags):
        yield P.info_export(size, flags)
        wanted = set(request.requests)
        if P.Info.NAME in wanted:
            yield P.info_string(P.Info.NAME, request.name)
        if P.Info.DESCRIPTION in wanted:
            yield P.info_string(P.Info.DESCRIPTION, self.catalog.description(info))
        if P.Info.BLOCK_SIZE in wanted:
            yield P.info_block_size(1, self.catalog.preferred_block(), P.MAX_PAYLOAD)

    def _list(self, option: int, data: bytes):
        if data:
            raise P.OptionError(P.Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        for info in self.catalog.list():
            self._reply(option, P.Rep.SERVER, P.rep_server(info.name, self.catalog.description(info)))
        self._reply(option, P.Rep.ACK)

    def _structured_reply(self, option: int, data: bytes):
        if data:
            raise P.OptionError(P.Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        self.structured = True
        self._reply(option, P.Rep.ACK)

    def _meta_context(self, option: int, data: bytes):
        if not self.structured:
            raise P.OptionError(P.Rep.ERR_INVALID, "negotiate structured replies first")
        request = P.decode_meta_context_request(data)
        try:
            self.catalog.describe(request.name)
        except ThinstoreError as exc:
            raise P.OptionError(P.Rep.ERR_UNKNOWN, f"no export {request.name!r}: {exc}") from None
        listing = option == P.Opt.LIST_META_CONTEXT
        bases = self.catalog.diff_bases(request.name) if listing else ()
        chosen = P.match_meta_contexts(request.queries, listing, bases,
                                       self.catalog.is_diff_base)
        if not listing:
            self.meta_export, self.meta_contexts = request.name, chosen
        for i, name in enumerate(chosen):
            self._reply(option, P.Rep.META_CONTEXT,
                        P.rep_meta_context(0 if listing else _context_id(chosen, i), name))
        self._reply(option, P.Rep.ACK)

    def _starttls(self, data: bytes):
        if data:
            raise P.OptionError(P.Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.config.tls_context is None:
            raise P.OptionError(P.Rep.ERR_POLICY, "TLS is not configured on this server")
        if self.tls:
            raise P.OptionError(P.Rep.ERR_INVALID, "TLS is already running")
        self._reply(P.Opt.STARTTLS, P.Rep.ACK)
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        try:
            self.sock = self.config.tls_context.wrap_socket(self.sock, server_side=True)
        except OSError as exc:
            raise HardDisconnect(f"TLS handshake failed: {exc}") from None
        self.tls = True
        self._forget()

    # -- helpers -------------------------------------------------------------
    def _clear_contexts_unless(self, name: str) -> None:
        if self.meta_export != name:
            self.meta_contexts = []

    def _agree(self, device) -> Agreement:
        chosen = self.meta_contexts if self.structured else []
        contexts = {_context_id(chosen, i): c for i, c in enumerate(chosen)}
        self.sock.settimeout(None)
        return Agreement(self.sock, device, self.structured, contexts, self.tls, self.catalog)


def _context_id(chosen: list[str], i: int) -> int:
    """base:allocation is id 1 (always); the other contexts take 2, 3, ... in order."""
    if chosen[i] == P.BASE_ALLOCATION:
        return P.BASE_ALLOCATION_ID
    return 2 + sum(1 for c in chosen[:i] if c != P.BASE_ALLOCATION)


_HANDLERS = {
    P.Opt.EXPORT_NAME: Negotiation._export_name,
    P.Opt.INFO: Negotiation._info_or_go,
    P.Opt.GO: Negotiation._info_or_go,
    P.Opt.LIST: Negotiation._list,
    P.Opt.STRUCTURED_REPLY: Negotiation._structured_reply,
    P.Opt.LIST_META_CONTEXT: Negotiation._meta_context,
    P.Opt.SET_META_CONTEXT: Negotiation._meta_context,
}
