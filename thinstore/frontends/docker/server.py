"""The plugin's HTTP side: Docker's plugin protocol over a unix socket.

Docker's plugin API (docs.docker.com/engine/extend/plugin_api/): the daemon POSTs a JSON
object to ``/Plugin.Activate`` and ``/VolumeDriver.<Verb>`` with ``Accept:
application/vnd.docker.plugins.v1.2+json`` and often no Content-Type; the answer is a JSON
object with that media type.  Every answer carries ``Err``: empty on success, else what
went wrong.  Status codes: 200 for every answer of a known verb (success or refusal:
Docker reads Err), 400 for a body that is not a JSON object, 404 for an unknown path, 405
for another HTTP method, 413 for a body over :data:`MAX_BODY`.  No request, however
malformed, stops the server.

Built on the standard library's :class:`http.server.ThreadingHTTPServer` (one thread per
connection), bound to an AF_UNIX socket.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
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

    def __init__(self, path: str, driver: VolumeDriver):
        self.driver, self.path = driver, os.path.abspath(path)
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
        length = self.headers.get("Content-Length")
        try:
            n = int(length) if length is not None else 0
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY:
            self.close_connection = True
            self._answer(400 if n < 0 else 413,
                         {"Err": f"bad Content-Length {length!r}: at most {MAX_BODY} bytes"})
            return None
        return self.rfile.read(n)

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

    def log_message(self, format: str, *args) -> None:
        log.info("%.3f plugin: " + format, time.time(), *args)

