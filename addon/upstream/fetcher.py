"""A blob fill's upstream request, with its bytes on a thread of their own, off the event loop every
client shares. mitmproxy's addons still decide and see everything, hooks run in its core's order
(`internals.RequestHooks`), and the body goes to the fill's sink directly; an upstream proxy over
TLS and plain HTTP go through the core instead (`handles`)."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading
import time
from typing import Any, cast

import h11
from mitmproxy import flow as flow_module
from mitmproxy import http
from mitmproxy.connection import Server
from mitmproxy.net.http import http1
from OpenSSL import SSL

from ..mitm import internals
from ..units import decimal

logger = logging.getLogger(__name__)

# One socket read, into a buffer the connection reuses: the TLS records it holds are decrypted
# one by one from there. Larger reads mean fewer syscalls and fewer trips through the TLS library.
READ_SIZE = 256 * 1024
TLS_OUT = 16384  # what TLS has to send at once (the request, handshake messages): small
CHUNK = 1024 * 1024  # body bytes handed to the fill's writer at once
FLUSH = 0.05  # seconds: bytes are handed over no later than this after they came, for the clients streaming them
MAX_HEAD = 64 * 1024  # a response head (status line and headers) larger than this is refused


# Where body bytes go: the stream callable the fill's sink gives (its writer). It is handed a view
# of a buffer that is read into again once it returns: it takes the bytes (hashes and writes them,
# or copies them) before returning.
Stream = internals.Stream


class Failed(Exception):
    """The exchange ended without a response; the message is mitmproxy's flow error."""


class _NoConnection(Failed):
    """The connection (or the upstream proxy's tunnel) could not be opened: what mitmproxy's
    `server_connect_error` hook is told of."""


def handles(flow: http.HTTPFlow) -> bool:
    """Whether this module can carry the request: https, directly or through an HTTP proxy."""
    if flow.request.scheme != "https":
        return False
    proxy = internals.upstream_proxy()
    return proxy is None or proxy[0] == "http"


class Exchange:
    """One request and its response, as `ReplayHandler` would run it; `task` ends when the
    response (or error) hook has run, and `cancel` cuts it. The body goes where `sink` says."""

    def __init__(self, flow: http.HTTPFlow, idle_timeout: float, sink: internals.Sink | None = None):
        self.flow = flow
        self.sink = sink
        # Connecting may take this long; once connected, upstream.run's idle check cuts a silent exchange.
        self.connect_timeout = idle_timeout
        self._sock: socket.socket | None = None
        self._conn: _Connection | None = None
        self._cancelled = threading.Event()
        self.task = asyncio.ensure_future(self._run())

    def cancel(self, reason: str) -> None:
        self._cancelled.set()
        if self._conn is not None:
            self._conn.proceed(None)
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading it
            except OSError:
                pass
        if not self.flow.error:
            self.flow.error = flow_module.Error(reason)

    async def _run(self) -> None:
        flow = self.flow
        hooks = internals.RequestHooks(flow)
        await hooks.request()
        if flow.response is None and not flow.error:
            try:
                await self._exchange(hooks)
            except Failed as e:
                flow.error = flow.error or flow_module.Error(str(e))  # cancel() said why first
        await hooks.end()

    async def _exchange(self, hooks: internals.RequestHooks) -> None:
        flow = self.flow
        server = internals.server_for(flow.request)
        data = await hooks.server_connect(server)
        if server.error:
            await hooks.server_connect_error(data)
            raise Failed(f"Connection killed: {server.error}")
        connect = None
        if server.via:
            connect = internals.connect_request(server)
            await hooks.http_connect_upstream(connect)
        try:
            start = await hooks.tls_start_server(server)
        except (RuntimeError, ValueError) as e:  # TlsConfig: unreadable CA or client certificate
            raise Failed(f"TLS settings: {e}") from e
        assert start.ssl_conn, "tls_start_server made no TLS connection"
        loop = asyncio.get_running_loop()
        head: asyncio.Future[_Connection] = loop.create_future()
        thread = threading.Thread(
            target=self._transfer, args=(server, connect, start.ssl_conn, head, loop), name="hubcache fetch", daemon=True
        )
        thread.start()
        try:
            conn = await head
        except _NoConnection as e:
            server.error = str(e)
            await hooks.server_connect_error(data)
            raise
        self._conn = conn
        body = conn.body = loop.create_future()
        try:
            assert conn.response
            flow.response = response = conn.response
            await hooks.responseheaders()
            if self.sink:
                internals.take(flow, self.sink)
            if flow.error:  # killed: its body is not read
                return
            conn.proceed(response.stream)
            await body
        finally:
            conn.proceed(None)  # a thread still waiting for the go ends now
            await asyncio.to_thread(thread.join)

    # on the thread

    def _transfer(
        self,
        server: Server,
        connect: http.HTTPFlow | None,
        ssl_conn: SSL.Connection,
        head: asyncio.Future[_Connection],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        def settle(future: asyncio.Future, error: BaseException | None, value: object = None) -> None:
            def set() -> None:
                if future.done():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(value)

            try:
                loop.call_soon_threadsafe(set)
            except RuntimeError:  # the loop closed: mitmproxy is shutting down
                pass

        try:
            try:
                conn = self._open(server, connect, ssl_conn)
                conn.read_head()
            except Exception as e:
                settle(head, _failure(e, server))
                return
            settle(head, None, conn)
            if (stream := conn.wait()) is None or self._cancelled.is_set():
                return
            assert conn.body
            try:
                conn.read_body(stream)
            except Exception as e:
                settle(conn.body, _failure(e, server, "upstream's answer broke off"))
            else:
                settle(conn.body, None)
        finally:
            if self._sock is not None:
                self._sock.close()

    def _open(self, server: Server, connect: http.HTTPFlow | None, ssl_conn: SSL.Connection) -> _Connection:
        assert server.address
        target = server.via[1] if server.via else server.address
        source = (server.sockname[0], 0) if server.sockname else None
        try:
            sock = self._sock = socket.create_connection(target, timeout=self.connect_timeout, source_address=source)
            if self._cancelled.is_set():
                raise OSError("cancelled")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if connect is not None:
                _tunnel(sock, connect)
            # Blocking from here on: cancel() wakes a read by shutting the socket down.
            sock.settimeout(None)
        except OSError as e:
            raise _NoConnection(str(e) or type(e).__name__) from e
        conn = _Connection(sock, ssl_conn, self.flow.request)
        conn.handshake()
        return conn


def _failure(error: Exception, server: Server, what: str = "upstream's answer is unreadable") -> Failed:
    """Any error on the thread, as one line for the flow (and the operator)."""
    if isinstance(error, Failed):
        return error
    if isinstance(error, SSL.Error):
        return Failed(f"TLS with {server.sni} failed: {_ssl_reason(error)}")
    if isinstance(error, h11.LocalProtocolError):
        return Failed(f"hubcache could not write the request: {error}")
    if not isinstance(error, (OSError, h11.ProtocolError)):
        logger.error(f"hubcache: fetching from {server.sni} failed unexpectedly", exc_info=error)
    return Failed(f"{what}: {error or type(error).__name__}")


def _ssl_reason(error: SSL.Error) -> str:
    """OpenSSL's reason (e.g. 'certificate verify failed'), not its list of tuples."""
    reasons = [part[-1] for part in (error.args[0] if error.args and isinstance(error.args[0], list) else []) if part]
    return "; ".join(str(r) for r in reasons) or str(error) or type(error).__name__


def _tunnel(sock: socket.socket, connect: http.HTTPFlow) -> None:
    sock.sendall(http1.assemble_request(connect.request))
    received = b""
    while b"\r\n\r\n" not in received:
        if len(received) > MAX_HEAD or not (data := sock.recv(4096)):
            raise _NoConnection("the upstream proxy closed the connection during CONNECT")
        received += data
    head, _, rest = received.partition(b"\r\n\r\n")
    try:
        response = http1.read_response_head(head.split(b"\r\n"))
    except ValueError as e:
        raise _NoConnection(f"the upstream proxy's answer to CONNECT is unreadable: {e}") from e
    if not 200 <= response.status_code < 300:
        raise _NoConnection(f"Upstream proxy refused HTTP CONNECT request: {response.status_code} {response.reason}")
    if rest:
        raise _NoConnection("the upstream proxy sent data before TLS")


class _Connection:
    """TLS over a blocking socket through the memory BIO of mitmproxy's connection object, and
    HTTP/1.1 over it (h11)."""

    def __init__(self, sock: socket.socket, ssl_conn: SSL.Connection, request: http.Request):
        self.sock = sock
        self.tls = ssl_conn
        self.request = request
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.response: http.Response | None = None
        self.body: asyncio.Future[None] | None = None  # settled once the body is read
        self._go = threading.Event()
        self._stream: Stream | None = None
        self._received = memoryview(bytearray(READ_SIZE))

    # TLS

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except SSL.WantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        while True:
            try:
                data = self.tls.bio_read(TLS_OUT)
            except SSL.WantReadError:
                return
            self.sock.sendall(data)

    def _fill(self, deadline: float | None = None) -> bool:
        """One socket read into TLS. With a deadline, False when nothing arrived by then."""
        try:
            # One syscall when bytes are waiting, the common case of a fast transfer.
            n = self.sock.recv_into(self._received, 0, socket.MSG_DONTWAIT if deadline is not None else 0)
        except BlockingIOError:
            assert deadline is not None
            waiting = select.poll()  # not select(2): a proxy holding many connections numbers sockets past 1023
            waiting.register(self.sock, select.POLLIN)
            if not waiting.poll(max(0.0, deadline - time.monotonic()) * 1000):
                return False
            n = self.sock.recv_into(self._received)
        if n:
            self.tls.bio_write(self._received[:n])
        else:
            self.tls.bio_shutdown()  # TLS tells a clean end (close_notify) from a cut
        return True

    def _read(self, deadline: float | None = None) -> bytes | None:
        """One TLS record's bytes, for h11 (the head, a chunked body): b'' at the end, None when
        nothing came by the deadline."""
        record = bytearray(16384)
        n = self._read_into(memoryview(record), deadline)
        return None if n is None else bytes(record[:n])

    def _read_into(self, view: memoryview, deadline: float | None) -> int | None:
        """Decrypt into `view`, a TLS record at most: 0 at the end, None when nothing came by
        the deadline."""
        while True:
            try:
                # Any writable buffer does; pyOpenSSL's annotation has named other types across versions.
                return self.tls.recv_into(cast(Any, view), min(len(view), 16384))
            except SSL.WantReadError:
                self._flush()
                if not self._fill(deadline):
                    return None
            except SSL.ZeroReturnError:
                return 0
            except SSL.SysCallError as e:
                if e.args and e.args[0] == -1:  # EOF without close_notify: the framing says if it was whole
                    return 0
                raise OSError(str(e)) from e

    def _send(self, data: bytes) -> None:
        self.tls.sendall(data)
        self._flush()

    # HTTP/1.1

    def read_head(self) -> None:
        request = self.request
        headers = [(k, v) for k, v in request.headers.fields if not k.startswith(b":") and k.lower() != b"host"]
        host = request.host_header or request.authority or request.pretty_host
        headers.insert(0, (b"Host", host.encode("idna") if not host.isascii() else host.encode()))
        self._send(self.http.send(h11.Request(method=request.method, target=request.path, headers=headers)) or b"")
        self._send(self.http.send(h11.EndOfMessage()) or b"")
        while True:
            event = self._next()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                # h11 bounds only a head still incomplete; one that arrived whole is bounded here.
                if sum(len(name) + len(value) + 4 for name, value in event.headers.raw_items()) > MAX_HEAD:
                    raise h11.RemoteProtocolError(f"its head is larger than {MAX_HEAD} bytes")
                self.response = http.Response(
                    b"HTTP/1.1", event.status_code, event.reason, http.Headers(list(event.headers.raw_items())),
                    None, None, time.time(), None,
                )
                return
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before the response")

    def proceed(self, stream: object) -> None:
        """From the event loop, once the `responseheaders` hook ran: the stream callable it set
        for the body, or None (not a callable): the body is not read."""
        if not self._go.is_set():
            self._stream = stream if callable(stream) else None
            self._go.set()

    def wait(self) -> Stream | None:
        self._go.wait()
        return self._stream

    def read_body(self, stream: Stream) -> None:
        """Send the body to the stream callable in chunks of up to CHUNK bytes, each handed over
        within FLUSH seconds of its first byte (a stalled upstream leaves nothing held back);
        then b'' to it, as mitmproxy's core does at the end. A body framed by Content-Length is
        read past h11, which would cost Python work per socket read, and decrypted into one
        buffer, reused chunk after chunk: no memory is allocated (and faulted in) per chunk."""
        assert self.response
        length = decimal(self.response.headers.get("content-length", ""))
        if "transfer-encoding" in self.response.headers or length is None:
            out = _Chunks(stream)
            while not isinstance(event := self.http.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    if (data := self._read(out.deadline)) is None:
                        out.flush()
                    else:
                        self.http.receive_data(data)
                elif isinstance(event, h11.Data):
                    out.add(event.data)
                else:
                    raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in the body")
            out.flush()
        else:
            left = length
            if left and isinstance(first := self._next(), h11.Data):  # what came with the head
                stream(first.data)
                left -= len(first.data)
            buffer = memoryview(bytearray(min(CHUNK, left)))
            while left > 0:
                # Decrypted straight into what the stream callable gets: no copy in between.
                chunk, got, deadline = buffer[: min(len(buffer), left)], 0, None
                while got < len(chunk) and (n := self._read_into(chunk[got:], deadline)) is not None:
                    if not n:
                        raise h11.RemoteProtocolError(f"the connection closed {left - got} bytes before the end of the body")
                    deadline = deadline or time.monotonic() + FLUSH
                    got += n
                stream(chunk[:got])
                left -= got
        stream(b"")
        self.response.timestamp_end = time.time()

    def _next(self) -> object:
        while (event := self.http.next_event()) is h11.NEED_DATA:
            self.http.receive_data(self._read() or b"")
        return event


class _Chunks:
    """Gathers body bytes into chunks of up to CHUNK bytes; `deadline` is when the first byte
    waiting must be handed over (None: nothing waits)."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.parts: list[bytes] = []
        self.size = 0
        self.deadline: float | None = None

    def add(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)
        self.deadline = self.deadline or time.monotonic() + FLUSH
        if self.size >= CHUNK or time.monotonic() > self.deadline:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.stream(b"".join(self.parts))
            self.parts.clear()
            self.size = 0
        self.deadline = None
