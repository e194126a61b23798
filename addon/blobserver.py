"""A loopback HTTP server that sends cached blobs from disk.

mitmproxy can only send an addon-made body from memory, so a blob hit is routed here instead:
the addon points the flow at `http://127.0.0.1:<port>/blobs/<digest>` and mitmproxy streams the
answer to the client. The bytes go from the page cache to the socket with sendfile(2) in a
worker thread, never through Python memory and never on mitmproxy's event loop. `Range` is
honoured with an exact 206, which dockerd requires to resume a layer.
"""

from __future__ import annotations

import logging
import os
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import protocol
from .store import Store

logger = logging.getLogger(__name__)

PREFIX = "/blobs/"


class BlobServer:
    def __init__(self, store: Store, host: str = "127.0.0.1"):
        self.store = store
        handler = type("Handler", (_Handler,), {"store": store})
        self._server = ThreadingHTTPServer((host, 0), handler)
        self._server.daemon_threads = True
        # A short poll interval: stopping (reconfiguring, shutting down) waits for one poll.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="hubcache blob server", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    store: Store
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        digest = self.path[len(PREFIX) :] if self.path.startswith(PREFIX) else ""
        if not protocol.DIGEST_RE.fullmatch(digest):
            return self._error(404, "BLOB_UNKNOWN", "not a blob path")
        blob = self.store.open_blob(digest)
        if blob is None:
            return self._error(404, "BLOB_UNKNOWN", f"blob {digest} is not in the cache")
        with blob:
            size = os.fstat(blob.fileno()).st_size
            try:
                span = protocol.parse_range(self.headers.get("Range"), size)
            except protocol.BadRequest as e:
                return self._error(e.status, e.code, e.message, {"Content-Range": f"bytes */{size}"})
            headers = protocol.blob_headers(digest, size)
            if span is None:
                status, offset, count = HTTPStatus.OK, 0, size
            else:
                status, offset, count = HTTPStatus.PARTIAL_CONTENT, span[0], span[1] - span[0] + 1
                headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
                headers["Content-Length"] = str(count)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body and count:
                try:
                    self.wfile.flush()
                    self.connection.sendfile(blob, offset, count)
                except OSError:  # mitmproxy went away (client aborted): nothing to clean up
                    self.close_connection = True

    def _error(self, status: int, code: str, message: str, extra: dict | None = None) -> None:
        body = protocol.error_body(code, message)
        self.send_response(status)
        for name, value in {**protocol.error_headers(len(body)), **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        logger.debug("blob server: " + format % args)
