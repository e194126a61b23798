"""The blob server: a process of its own that sends blobs to clients, from the store or from a fill
as its file grows (the last byte held back until the fill verified), by URLs the proxy signed.
Bodies go in large writes from one reused buffer, or by sendfile(2) where the kernel encrypts (kTLS).

Run by the proxy as `python -m hubcache.blobserver.server`; it prints its ports, then a line
`sent <tag> <bytes>` for every finished transfer whose URL carried a tag (for the proxy's metrics
and pull log), and exits when the proxy closes its stdin (or dies)."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..registry import protocol
from ..storage.store import Store
from ..units import decimal
from .listeners import HEAD, AddressShare, BoundedHead, BoundedThreads, Watched, allow_files, linger

logger = logging.getLogger(__name__)

BLOB_HOST = "blobs.hubcache.invalid"  # never resolved: the proxy routes it (RFC 2606 name)
SECRET_ENV = "HUBCACHE_BLOB_SECRET"
URL_TTL = 600  # seconds a signed URL stays valid, like a CDN's
CHUNK = 4 * 1024 * 1024  # sendfile(2) spans (kTLS)
BUFFER = 1024 * 1024  # one write: large enough for few calls, small enough to stay in the CPU's cache
RECORD = 16 * 1024  # a TLS record's most plaintext: the smallest write worth making
TICKETS = 2  # TLS 1.3 session tickets per full handshake: a client's next connections resume
ULP_FILE = Path("/proc/sys/net/ipv4/tcp_available_ulp")
SOL_TLS, TLS_TX = 282, 1  # linux/tls.h: set on a socket whose sending OpenSSL gave to the kernel
POLL = 0.02  # seconds between looks at a growing fill
COMMIT_WAIT = 10.0
MAX_CONNECT_HEAD = 8192
HEAD_TIMEOUT = 10.0  # default seconds for a TLS handshake and a request head
MIN_RATE = 16 * 1024  # default bytes per second a client must read its answer at
GRACE = 5.0  # seconds every write to a client may take besides its size at the minimum rate
_FILL_NAME = re.compile(r"[0-9]+/[A-Za-z0-9_]+/fill-[A-Za-z0-9_]+")
_thread_buffers = threading.local()  # each worker thread's write buffer (`_Handler._buffer`)
_QUERY = ("expires", "signature", "fill", "size", "tag")  # what signed_path writes, each once


class _Cut(Exception):
    """The body cannot be completed: drop the connection so the client sees a broken transfer."""


def sign(secret: bytes, digest: str, expires: int, fill: str = "", size: int = 0, tag: str = "") -> str:
    message = f"{digest}|{expires}|{fill}|{size}|{tag}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def signed_path(
    secret: bytes, digest: str, fill: str = "", size: int = 0, tag: str = "", now: float | None = None
) -> str:
    """The path and query of a URL for `digest`; with `fill`, the temporary file (relative to the
    store's tmp folder) of a fill in progress and the blob's size; with `tag`, the name under
    which its transfers are reported."""
    expires = int((now or time.time()) + URL_TTL)
    query: dict[str, object] = {"expires": expires, "signature": sign(secret, digest, expires, fill, size, tag)}
    if fill:
        query.update(fill=fill, size=size)
    if tag:
        query["tag"] = tag
    return f"/blobs/{digest}?{urlencode(query)}"


_report_lock = threading.Lock()


def _report(tag: str, sent: int) -> None:
    with _report_lock:
        sys.stdout.write(f"sent {tag} {sent}\n")
        sys.stdout.flush()


def parse_query(query: str) -> dict[str, str] | None:
    """The fields of a blob URL's query, percent-decoded; None unless each is one `signed_path`
    writes, given once, with `expires` and `size` as plain numbers (checked before anything reads
    them: the signature covers their values, not their spelling) and an ASCII `signature`."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=len(_QUERY)) if query else []
    except ValueError:
        return None
    fields = dict(pairs)
    if len(fields) != len(pairs) or not fields.keys() <= set(_QUERY):
        return None
    if not fields.get("signature", "").isascii():
        return None  # `sign` writes hex; `hmac.compare_digest` takes no other text
    if any(decimal(fields.get(name, "0")) is None for name in ("expires", "size")):
        return None
    return fields


class _Handler(BoundedHead):
    store: Store
    secret: bytes
    server: _PlainServer
    protocol_version = "HTTP/1.1"
    _tag = ""  # of the request being answered
    _sent = 0  # bytes of its body sent so far
    _refused = False  # a request refused before its head or body was read whole

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self._expect(self.server.head_timeout, HEAD)  # the next request, on a kept connection

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if parsed and self.request_version == "HTTP/0.9":
            # http.server would answer it without a status line or headers: a blob's bytes alone,
            # which nothing in between could frame.
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/0.9 is not served")
            return False
        if parsed:
            self._expect(None, "")  # the head is in: what follows is the server's work first
        return parsed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed or oversized head, HTTP/2, another method) as
        registry errors; the connection closes, as its head may not have been read whole."""
        self.close_connection = self._refused = True
        self._tag = ""
        if self.request_version == "HTTP/0.9":
            self.request_version = self.protocol_version  # its request line is unreadable: answer with a status line
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method other than GET and HEAD
            return self._error(protocol.ErrorCode.UNSUPPORTED, f"the blob server serves GET and HEAD only, not {self.command[:16]!r}")
        error = protocol.ErrorCode.UNSUPPORTED_REQUEST
        self._error(error, f"{code} {explain or message or HTTPStatus(code).phrase}", status=code)

    def finish(self) -> None:
        super().finish()
        if self._refused:
            linger(self.connection)

    def _expect(self, seconds: float | None, task: str) -> None:
        """The client's next deadline (see `Watched.expect`)."""
        if watched := self._watched():
            watched.expect(seconds, task)

    def _watched(self) -> Watched | None:
        deadlines = self.server.deadlines
        return deadlines.current() if deadlines else None

    def _write_time(self, count: int) -> float:
        """Seconds a client may take to read `count` bytes."""
        return GRACE + count / self.server.min_rate

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        self._tag = ""  # reported once the URL proved valid
        if refused := self._ambiguous():
            self.close_connection = self._refused = True
            logger.info(f"blob server: {self.client_address[0]}: {refused[1]}")
            return self._error(*refused)
        url = urlsplit(self.path)
        query = parse_query(url.query) or {}
        digest = url.path.removeprefix("/blobs/")
        fill, size, expires = query.get("fill", ""), query.get("size", "0"), query.get("expires", "")
        tag = query.get("tag", "")
        if not (
            protocol.DIGEST_RE.fullmatch(digest)
            and expires
            and int(expires) >= time.time()
            and hmac.compare_digest(
                sign(self.secret, digest, int(expires), fill, int(size), tag), query.get("signature", "")
            )
        ):
            return self._error(protocol.ErrorCode.DENIED, "this blob URL is not valid (or has expired): ask the registry again")
        self._tag = tag
        blob = self.store.open_blob(digest)
        if blob is None and fill and _FILL_NAME.fullmatch(fill):
            try:
                blob = open(self.store.directory / "tmp" / fill, "rb")  # noqa: SIM115 (_send closes it)
            except FileNotFoundError:
                blob = self._committed(digest)
            else:
                return self._send(blob, digest, int(size), send_body, growing=True)
        if blob is None:
            return self._error(protocol.ErrorCode.BLOB_UNKNOWN, f"blob {digest} is not in the cache")
        self._send(blob, digest, os.fstat(blob.fileno()).st_size, send_body, growing=False)

    def _ambiguous(self) -> tuple[protocol.ErrorCode, str] | None:
        """What in this request's head another HTTP parser (a server in front) could read otherwise
        than http.server: a line that is no header, a folded one, a body. A body is never read, so
        its bytes would be taken for the next request on the connection."""
        headers = self.headers
        if headers.defects or headers.get_payload() or any("\n" in value for value in headers.values()):
            return protocol.ErrorCode.UNSUPPORTED_REQUEST, "the request head has a line that is no header, or a folded one"
        if "Transfer-Encoding" in headers or set(headers.get_all("Content-Length", ["0"])) != {"0"}:
            return protocol.ErrorCode.BODY_UNSUPPORTED, f"a {self.command} of a blob takes no body"
        return None

    def _committed(self, digest: str) -> BinaryIO | None:
        """The blob of a fill whose file is gone: committed, or failed. A commit moves the file
        before it enters the store's index, so give the index a moment."""
        deadline = time.monotonic() + COMMIT_WAIT
        while (blob := self.store.open_blob(digest)) is None and time.monotonic() < deadline:
            time.sleep(POLL)
        return blob

    def _send(self, blob: BinaryIO, digest: str, size: int, send_body: bool, growing: bool) -> None:
        with blob:
            try:
                span = protocol.parse_range(self.headers.get("Range"), size)
            except protocol.BadRequest as e:
                return self._error(e.code, e.message, {"Content-Range": f"bytes */{size}"})
            headers = protocol.blob_headers(digest, size)
            first, last = span or (0, size - 1)
            status = HTTPStatus.OK if span is None else HTTPStatus.PARTIAL_CONTENT
            if span is not None:
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
                headers["Content-Length"] = str(last - first + 1)
            with self.server.transfer(self.client_address[0]):
                self._expect(GRACE, "read the answer's head")
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self._sent = 0
                try:
                    if send_body:
                        self._copy(blob, digest, first, last + 1, size, growing)
                except (_Cut, OSError) as e:
                    watched = self._watched()
                    why = f"the client did not {watched.task} in time" if watched and watched.cut else e
                    logger.info(f"blob {digest}: transfer cut: {why}")
                    self.close_connection = True
                finally:
                    if self._tag:
                        _report(self._tag, self._sent)

    def _copy(self, blob: BinaryIO, digest: str, start: int, end: int, size: int, growing: bool) -> None:
        fd = blob.fileno()
        # sendfile(2) only where the kernel encrypts (kTLS) and so reads the pages itself. Else
        # writes from a buffer, for a plain client too: with sendfile its own kernel would copy the
        # bytes out of the page cache on the client's time, a copy its one pulling core then
        # carries (docs/architecture.md, "The blob server's writes to a plain client").
        by_kernel = isinstance(self.connection, ssl.SSLSocket) and kernel_tls(self.connection)
        span = CHUNK if by_kernel else self._write_span()
        position = start
        while position < end:
            limit = end
            if growing:
                # Everything written so far, except the blob's last byte until the fill committed.
                limit = min(end, os.fstat(fd).st_size, size - 1)
                if position >= limit:
                    if self.store.has_blob(digest) and (committed := self.store.open_blob(digest)):
                        # Verified and committed: by this fill (its file moved there), or by
                        # another proxy's fill of the same blob on this folder. The rest comes
                        # from the store's copy, which is whole.
                        with committed:
                            self._copy(committed, digest, position, end, size, growing=False)
                        return
                    if os.fstat(fd).st_nlink == 0:
                        raise _Cut("the fill failed and was discarded")
                    else:
                        self._expect(None, "")  # waiting for upstream, not for the client
                        time.sleep(POLL)
                    continue
            count = min(span, limit - position)
            self._expect(self._write_time(count), f"read {count} bytes at {self.server.min_rate} bytes/s")
            sent = self._sendfile(blob, position, count) if by_kernel else self._write(blob, position, count)
            if not sent:
                raise _Cut("the file is shorter than its size")
            position += sent
            self._sent += sent

    def _write_span(self) -> int:
        """Bytes per write: BUFFER, or fewer so that the write's deadline comes within
        client_idle_timeout (or a TLS record's time at the minimum rate and GRACE, if that is
        longer), as the socket's timeout would have (see `_write`)."""
        idle = self.server.idle_timeout
        if idle is None:
            return BUFFER
        return max(RECORD, min(BUFFER, int((idle - GRACE) * self.server.min_rate)))

    def _write(self, blob: BinaryIO, offset: int, count: int) -> int:
        view = self._buffer()[:count]
        read = os.preadv(blob.fileno(), [view], offset)
        # On a blocking socket: with a timeout, Python polls and retries each write (a quarter
        # more CPU per GiB here). The write's deadline cuts a client that stops reading.
        # Corked: OpenSSL writes each TLS record (16 KiB) on its own, and the kernel would send
        # most as a packet each; corked, it sends them in packets as large as the path takes (64
        # KiB over loopback), a quarter of the packets for both ends to handle.
        self.connection.settimeout(None)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            self.connection.sendall(view[:read])
        finally:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)  # sends what is left
            self.connection.settimeout(self.server.idle_timeout)
        return read

    def _sendfile(self, blob: BinaryIO, offset: int, count: int) -> int:
        self.wfile.flush()
        # kTLS: the kernel encrypts what sendfile(2) sends (as OpenSSL's SSL_sendfile).
        return socket.socket.sendfile(self.connection, blob, offset, count)

    def _buffer(self) -> memoryview:
        """The thread's one write buffer, made at its first blob and kept for the next
        connections its worker serves."""
        chunk: memoryview | None = getattr(_thread_buffers, "chunk", None)
        if chunk is None:
            chunk = _thread_buffers.chunk = memoryview(bytearray(BUFFER))
        return chunk

    def _error(self, code: protocol.ErrorCode, message: str, extra: dict | None = None, status: int | None = None) -> None:
        body = protocol.error_body(code, message)
        self._expect(self._write_time(len(body)), "read the answer")
        self.send_response(status or code.status)
        for name, value in {**protocol.error_headers(len(body)), **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self._tag:
            _report(self._tag, 0)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("blob server: " + format % args)


class _PlainServer(BoundedThreads, HTTPServer):
    request_queue_size = 128  # many clients start their layers at once
    # Connections cost a worker thread each (which keeps its write buffer while it waits for the
    # next); answers being sent cost the disk.
    max_connections = 1024
    max_transfers = 256
    max_transfers_per_address: int | None = None  # of those, what one client address may hold (None: all)
    head_timeout: float | None = HEAD_TIMEOUT
    min_rate = MIN_RATE

    def server_activate(self) -> None:
        self._transfers = threading.BoundedSemaphore(self.max_transfers)
        self._transfer_share = AddressShare(self.max_transfers_per_address, self.max_transfers, "transfers to")
        super().server_activate()

    @contextmanager
    def transfer(self, address: str) -> Iterator[None]:
        """A transfer slot, waited for. With a share, a client address has at most
        `max_transfers_per_address` at once (its further transfers wait for its own), so one
        client's slow readers, each reading just fast enough, cannot hold every slot for hours."""
        self._transfer_share.take(address, wait=True)
        try:
            with self._transfers:
                yield
        finally:
            self._transfer_share.give_back(address)

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        logger.info(f"blob server: connection from {client_address[0]} failed: {sys.exc_info()[1]}")


class _TLSServer(_PlainServer):
    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.context = context

    def finish_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        assert isinstance(request, socket.socket)  # a TCP server's requests are sockets (the base class types UDP's too)
        # The handshake runs in the connection's own thread, never in the accepting one.
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)


class _NetworkServer(_TLSServer):
    """A listener for clients on other machines (`--network`): of its connections and transfers,
    one client address holds a quarter at most, so one client's idle connections or slow readers
    leave the others three quarters. (The loopback listeners have one client address, or the
    proxy's relay, for everyone.)"""

    max_per_address = _PlainServer.max_connections // 4
    max_transfers_per_address = _PlainServer.max_transfers // 4


class _TunnelServer(_TLSServer):
    """The HTTPS listener behind an HTTP CONNECT: in upstream proxy mode, mitmproxy opens every
    client tunnel through an upstream proxy, and the proxy names this listener as that proxy for
    the blob host's tunnels (see `BlobHost.http_connect`)."""

    def finish_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        assert isinstance(request, socket.socket)  # a TCP server's requests are sockets (the base class types UDP's too)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = request.recv(1)
            if not byte or len(head) > MAX_CONNECT_HEAD:
                return
            head += byte
        target = head.split(b" ", 2)[1] if head.startswith(b"CONNECT ") else b""
        if target.split(b":")[0].decode(errors="replace").lower() != BLOB_HOST:
            request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        super().finish_request(request, client_address)


def ktls_offered(ulp_file: Path = ULP_FILE) -> bool:
    """Whether this kernel offers kTLS (its `tls` upper layer protocol) and this ssl module can
    ask OpenSSL to use it."""
    try:
        offered = "tls" in ulp_file.read_text().split()
    except OSError:
        return False
    return offered and hasattr(ssl, "OP_ENABLE_KTLS")


def kernel_tls(sock: socket.socket) -> bool:
    """Whether OpenSSL gave this connection's sending to the kernel (kTLS): it may fail to for a
    cipher or a kernel it does not know, and then writes records itself."""
    try:
        sock.getsockopt(SOL_TLS, TLS_TX, 64)
    except OSError:
        return False
    return True


def server_context(credentials_fd: int, ktls: bool) -> ssl.SSLContext:
    """A server context for the PEM certificate and key in `credentials_fd` (closed after)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(f"/proc/self/fd/{credentials_fd}")
    os.close(credentials_fd)
    context.num_tickets = TICKETS
    # The client's cipher order, not OpenSSL's (AES-256 first): a Go client on AES hardware asks
    # for AES-128-GCM first, the cheaper one for it and for this server alike.
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if ktls:
        context.options |= ssl.OP_ENABLE_KTLS
    return context


def main() -> None:
    parser = argparse.ArgumentParser(description="hubcache's blob server (started by the proxy)")
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument(
        "--credentials-fd", required=True, type=int, help="a file descriptor holding the PEM certificate and key for " + BLOB_HOST
    )
    parser.add_argument("--idle-timeout", type=float, default=60.0, help="seconds an idle connection is kept")
    parser.add_argument("--head-timeout", type=float, default=HEAD_TIMEOUT, help="seconds for a TLS handshake and a request head")
    parser.add_argument("--min-rate", type=int, default=MIN_RATE, help="bytes per second a client must read its answer at")
    parser.add_argument(
        "--network",
        nargs=3,
        action="append",
        default=[],
        metavar=("ADDRESS", "PORT", "FD"),
        help="also serve HTTPS on ADDRESS:PORT (0: any free port) for clients on other machines, with the PEM "
        "certificate and key in FD (the proxy's blob_listen, a mirror's address); its port is printed in order",
    )
    args = parser.parse_args()
    secret = bytes.fromhex(os.environ.pop(SECRET_ENV))
    logging.basicConfig(level=logging.WARNING, format="hubcache blob server: %(message)s")
    ktls = ktls_offered()
    context = server_context(args.credentials_fd, ktls)
    store = Store(args.cache_dir)
    handler = type("Handler", (_Handler,), {"store": store, "secret": secret})
    tls = _TLSServer(("127.0.0.1", 0), handler, context)
    plain = _PlainServer(("127.0.0.1", 0), handler)
    tunnel = _TunnelServer(("127.0.0.1", 0), handler, context)
    servers: list[_PlainServer] = [tls, plain, tunnel]
    for address, port, fd in args.network:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        network = type("_NetworkServer", (_NetworkServer,), {"address_family": family})
        try:
            servers.append(network((address, int(port)), handler, server_context(int(fd), ktls)))
        except OSError as e:
            logger.error(f"cannot listen on {address}:{port} for clients on other machines: {e.strerror or e}")
            sys.exit(2)
    # Per connection: its socket, the copy its deadlines watch, a blob, and its worker's SQLite
    # connection to the store (the database, its -wal and -shm), on every listener at once.
    allow_files(6 * _PlainServer.max_connections * len(servers))
    for server in servers:
        server.idle_timeout = args.idle_timeout
        server.head_timeout = args.head_timeout
        server.min_rate = args.min_rate
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    print("ktls" if ktls else "userspace", *(server.server_address[1] for server in servers), flush=True)
    tls.serve_forever()


def _exit_with_parent() -> None:
    sys.stdin.buffer.read()  # returns at EOF: the proxy closed the pipe or died
    os._exit(0)


if __name__ == "__main__":
    main()
