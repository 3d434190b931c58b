"""The plugin's HTTP side: Docker's plugin protocol over a unix socket.

Docker's plugin API (docs.docker.com/engine/extend/plugin_api/): the daemon POSTs a JSON
object to ``/Plugin.Activate`` and ``/VolumeDriver.<Verb>`` with ``Accept:
application/vnd.docker.plugins.v1.2+json`` and often no Content-Type; the answer is a JSON
object with that media type.  Every answer carries ``Err``: empty on success, else what
went wrong.  Status codes: 200 for every answer of a known verb (success or refusal:
Docker reads Err), 400 for a body that is not a JSON object, 404 for an unknown path, 405
for another HTTP method, 413 for a body over :data:`MAX_BODY` (sent with Content-Length
or chunked); http.server's own refusals (a bad request line) come as JSON too.  No
request, however malformed, stops the server.

Built on the standard library's :class:`http.server.ThreadingHTTPServer` (one thread per
connection), bound to an AF_UNIX socket.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from thinstore.control import short_socket_path
from thinstore.errors import ThinstoreError

from .driver import DriverError, VolumeDriver

log = logging.getLogger("thinstore.docker")

MEDIA_TYPE = "application/vnd.docker.plugins.v1+json"
MAX_BODY = 1 << 20
IDLE_TIMEOUT = 60.0             # a connection silent this long is closed


class PluginServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on a unix socket, answering for one :class:`VolumeDriver`."""

    address_family = socket.AF_UNIX
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 64

    def __init__(self, path: str, driver: VolumeDriver, idle_timeout: float = IDLE_TIMEOUT):
        self.driver, self.path = driver, os.path.abspath(path)
        self.idle_timeout = idle_timeout        # seconds a kept-alive connection may idle
        _clear_stale(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        super().__init__(self.path, Handler)
        self._thread: threading.Thread | None = None

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves a host name from the address: none on AF_UNIX
        old = os.umask(0o177)
        try:
            with short_socket_path(self.server_address) as short:
                self.socket.bind(short)
        finally:
            os.umask(old)
        self.server_name, self.server_port = "thinstore", 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="docker-plugin",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
        self.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _clear_stale(path: str) -> None:
    """Remove a socket left by a dead plugin; refuse one a live plugin answers on."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_socket_path(path) as short:
            probe.connect(short)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ThinstoreError(f"another plugin answers on {path}; stop it or choose another "
                         "--plugin-socket")


class Handler(BaseHTTPRequestHandler):
    """One connection: POST /Verb with a JSON body -> a JSON answer with Err."""

    protocol_version = "HTTP/1.1"
    server_version = "thinstore-docker-plugin"
    timeout = IDLE_TIMEOUT

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout
        super().setup()

    def do_POST(self) -> None:
        method = VolumeDriver.ROUTES.get(self.path.split("?", 1)[0])
        body = self._body()
        if body is None:
            return
        if method is None:
            self._answer(404, {"Err": f"unknown plugin call {self.path!r}: this plugin "
                                      f"answers {', '.join(sorted(VolumeDriver.ROUTES))}"})
            return
        try:
            request = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            self._answer(400, {"Err": f"{self.path}: malformed JSON body: {exc}"})
            return
        if not isinstance(request, dict):
            self._answer(400, {"Err": f"{self.path}: the body must be a JSON object"})
            return
        self._answer(200, self._call(method, request))

    def _call(self, method: str, request: dict) -> dict:
        try:
            answer = getattr(self.server.driver, method)(request)
            return {**answer, "Err": ""}
        except DriverError as exc:
            log.info("%s refused: %s", self.path, exc)
            return {"Err": str(exc)}
        except ThinstoreError as exc:
            return {"Err": str(exc)}
        except Exception as exc:            # a bug: answer it, keep serving
            log.exception("%s failed", self.path)
            return {"Err": f"internal error in {self.path}: {exc}"}

    def _body(self) -> bytes | None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._chunked_body()
        length = self.headers.get("Content-Length")
        try:
            n = int(length) if length is not None else 0
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY:
            return self._refuse(400 if n < 0 else 413,
                                f"bad Content-Length {length!r}: at most {MAX_BODY} bytes")
        return self.rfile.read(n)

    def _chunked_body(self) -> bytes | None:
        """A body sent with Transfer-Encoding: chunked (RFC 9112 §7.1), at most MAX_BODY."""
        body = b""
        while True:
            line = self.rfile.readline(256)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                return self._refuse(400, f"bad chunk size line {line[:40]!r}")
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass                            # trailer fields, ignored
                return body
            if len(body) + size > MAX_BODY:
                return self._refuse(413, f"a body of over {MAX_BODY} bytes")
            body += self.rfile.read(size)
            self.rfile.readline(8)

    def _refuse(self, status: int, what: str) -> None:
        self.close_connection = True
        self._answer(status, {"Err": f"{self.path}: {what}"})
        return None

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """http.server's own refusals (a bad request line, headers too long) in JSON too."""
        self.close_connection = True
        self.command = getattr(self, "command", None) or "POST"
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"       # else http.server sends no status line
        self._answer(code, {"Err": f"bad HTTP request: {message or code}"})

    def do_GET(self) -> None:
        self._answer(405, {"Err": f"{self.command} is not part of the plugin protocol: "
                                  "POST a JSON object"})

    do_PUT = do_DELETE = do_HEAD = do_GET

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", MEDIA_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def address_string(self) -> str:
        return "docker"                     # AF_UNIX peers have no address

    # http.server writes its lines to stderr with its own clock format; send them through
    # logging instead (the serve command's handler stamps the time).
    def log_message(self, format: str, *args) -> None:
        log.info("plugin: " + format, *args)

    def log_error(self, format: str, *args) -> None:
        """An idle keep-alive connection that dockerd leaves silent until IDLE_TIMEOUT is
        normal (debug); anything else http.server complains of is a warning."""
        idle = format.startswith("Request timed out")
        log.log(logging.DEBUG if idle else logging.WARNING, "plugin: " + format, *args)

