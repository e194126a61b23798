"""A hostile server on loopback for the trust-boundary tests: it answers like a registry that
says yes to everything (or redirects everything, or asks for Basic credentials) and records every
request it gets, headers included. Plain HTTP, or TLS with whatever certificate it is given."""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# The attacker's own image: a manifest that would resolve a tag somewhere else if it were cached.
EVIL_MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "e" * 64, "size": 2},
        "layers": [],
    }
).encode()
EVIL_DIGEST = "sha256:" + hashlib.sha256(EVIL_MANIFEST).hexdigest()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


# What an 'endless' blob sends before it ends after all: far more than any test's cache folder.
ENDLESS_BYTES = 512 * 1024 * 1024


class Hostile:
    """`mode`: 'yes' (HEAD 200 with its own digest, manifests its own, blob GETs 503), 'basic'
    (401 asking for Basic until a request brings credentials, then 'yes'), 'redirect' (every
    path 307 to /missing, which answers 404), or 'endless' ('yes', but a blob GET answers 200
    with a chunked body of no announced size, ENDLESS_BYTES long; `sent` counts its bytes)."""

    def __init__(self, mode: str = "yes", cert: Path | None = None, key: Path | None = None):
        self.mode = mode
        self.seen: list[Seen] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._connections = threading.Condition(self._lock)  # notified as each connection ends
        self._open = 0
        handler = type("Handler", (_Handler,), {"owner": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        if cert and key:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def wait_closed(self, timeout: float = 30) -> None:
        """Until every connection it was given has ended (its requests are all in `requests`)."""
        with self._connections:
            assert self._connections.wait_for(lambda: self._open == 0, timeout), f"{self._open} connections still open"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: Hostile
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        with self.owner._connections:
            self.owner._open += 1
        super().setup()

    def finish(self) -> None:
        super().finish()
        with self.owner._connections:
            self.owner._open -= 1
            self.owner._connections.notify_all()

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._read_body()
        self._answer()

    def _read_body(self) -> None:
        """What an HTTP/1.1 server reads of a request body: chunks, or Content-Length bytes, or
        none (then what follows is the next request)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0], 16):
                self.rfile.read(size + 2)
            self.rfile.readline()
        elif length := int(self.headers.get("Content-Length", "0")):
            self.rfile.read(length)

    def _answer(self) -> None:
        owner = self.owner
        with owner._lock:
            owner.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        if owner.mode == "redirect":
            if self.path.startswith("/missing"):
                return self._send(404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            return self._send(307, {"Location": "/missing"}, b"")
        if owner.mode == "basic" and "authorization" not in {k.lower() for k in self.headers}:
            return self._send(401, {"WWW-Authenticate": 'Basic realm="hostile"'}, b"")
        if "/manifests/" in self.path:
            headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": EVIL_DIGEST}
            return self._send(200, headers, EVIL_MANIFEST)
        if "/blobs/" in self.path and self.command == "GET" and owner.mode == "endless":
            return self._send_endless()
        if "/blobs/" in self.path and self.command == "GET":
            return self._send(503, {"Content-Type": "application/json"}, b'{"errors":[{"code":"UNAVAILABLE"}]}')
        return self._send(200, {"Content-Type": "application/json"}, b"{}")

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_endless(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"\0" * (1024 * 1024)
        framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        try:
            while self.owner.sent < ENDLESS_BYTES:
                self.wfile.write(framed)
                self.owner.sent += len(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the fetch was cut

    def log_message(self, format: str, *args) -> None:
        pass
