"""mitmproxy's internals that hubcache relies on, in one place: what its addon API does not offer.

- `RequestHooks` runs the hooks of one request in the order mitmproxy's core runs them (some
  through hook classes of private modules), for a blob fill's request carried on a thread of its
  own (upstream/fetcher.py); `connect_request` is the CONNECT mitmproxy would send an upstream proxy.
- `replay` sends hubcache's other requests through mitmproxy's core, like a client replay.
- `guard` swaps hubcache's stream into mitmproxy's HTTP layer (mitm/bodies.py says why), and
  `http_after_interception` puts that layer where mitmproxy would relay raw bytes.
- mitmproxy's own addons, asked by name: `nextlayer`, `proxyserver`, `tlsconfig`.
- The `mode` option: its upstream proxy (`upstream_proxy`), and listeners added to it.
- The loggers of mitmproxy's lines per connection (`FLOW_LOGGERS`).
- Its HTTP/1 server side (`_Http1Server`): its head reading (state, buffer, `read_headers`), and
  the error pages it writes (`send` of a `ResponseProtocolError`); its HTTP/2 server side
  (`_Http2Server`): its h2 events (`handle_h2_event`, `streams`, `protocol_error`).
- Its connection handler's reading loop (`close_cancelled_connections`: its transports, its event
  lock).

tests/unit/mitm/test_internals.py pins each against the installed mitmproxy (the hook order for a
request, the classes and attributes swapped), so an upgrade that changes one fails there, loudly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import h2.errors
import h2.events
from mitmproxy import certs, connection, ctx, http, tls
from mitmproxy import flow as flow_module
from mitmproxy.addons.clientplayback import ReplayHandler
from mitmproxy.net import server_spec
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events, layer, mode_specs, server_hooks
from mitmproxy.proxy import server as proxy_server
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers import tcp as tcp_layer
from mitmproxy.proxy.layers import tls as tls_layer
from mitmproxy.proxy.layers.http import _http1 as http1_layer
from mitmproxy.proxy.layers.http import _http2 as http2_layer
from mitmproxy.proxy.layers.http._hooks import HttpConnectUpstreamHook

from ..registry import protocol
from . import bodies

# Where a response's body goes: a stream callable, given each chunk and b'' at the end.
Stream = Callable[[bytes | bytearray | memoryview], object]
# The owner of a request's answer, asked once its head is in (after the responseheaders hook):
# the stream callable its body goes to, or None (read like any other answer). It may kill the flow.
Sink = Callable[[http.HTTPFlow], Stream | None]

# The hooks RequestHooks runs, in mitmproxy's order; mitmproxy's core runs these too for a request
# (and the ones in NOT_RUN), and no others.
RUN = (
    "requestheaders",
    "request",
    "server_connect",
    "server_connect_error",
    "http_connect_upstream",
    "tls_start_server",
    "responseheaders",
    "response",
    "error",
)
# The connection a fill's request runs on is hubcache's own, not one of mitmproxy's: no addon
# is told of its life.
NOT_RUN = ("server_connected", "tls_established_server", "tls_failed_server", "server_disconnected")


class RequestHooks:
    """The hooks of one request (`flow`), run by whoever carries it instead of mitmproxy's core."""

    def __init__(self, flow: http.HTTPFlow):
        self.flow = flow

    async def _run(self, hook: commands.StartHook) -> None:
        await ctx.master.addons.handle_lifecycle(hook)

    async def request(self) -> None:
        """`requestheaders`, then `request`; the flow is live meanwhile, as in mitmproxy's core (an
        addon may kill it)."""
        self.flow.live = True
        await self._run(http_layer.HttpRequestHeadersHook(self.flow))
        await self._run(http_layer.HttpRequestHook(self.flow))

    async def server_connect(self, server: connection.Server) -> server_hooks.ServerConnectionHookData:
        """`server_connect`: where the connection goes (`upstream_map`, loop guards), or
        `server.error` when an addon refused it."""
        data = server_hooks.ServerConnectionHookData(server=server, client=self.flow.client_conn)
        await self._run(server_hooks.ServerConnectHook(data))
        return data

    async def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        await self._run(server_hooks.ServerConnectErrorHook(data))

    async def http_connect_upstream(self, connect: http.HTTPFlow) -> None:
        """`http_connect_upstream` on the CONNECT an upstream proxy gets (`connect_request`)."""
        await self._run(HttpConnectUpstreamHook(connect))

    async def tls_start_server(self, server: connection.Server) -> tls.TlsData:
        """`tls_start_server`: mitmproxy's TLS settings (`tlsconfig`) make the connection object
        (`ssl_conn`). RuntimeError or ValueError: they are unusable (an unreadable CA...)."""
        context = Context(self.flow.client_conn, ctx.options)
        context.server = server
        start = tls.TlsData(server, context)
        await self._run(tls_layer.TlsStartServerHook(start))
        return start

    async def responseheaders(self) -> None:
        await self._run(http_layer.HttpResponseHeadersHook(self.flow))

    async def end(self) -> None:
        """`response` when there is one, else `error`; the flow is no longer live."""
        flow = self.flow
        if flow.response is not None and not flow.error:
            await self._run(http_layer.HttpResponseHook(flow))
        else:
            flow.response = None
            flow.error = flow.error or flow_module.Error("no response")
            await self._run(http_layer.HttpErrorHook(flow))
        flow.live = False


def server_for(request: http.Request) -> connection.Server:
    """The connection mitmproxy's core would open for an https request: TLS to its host, through
    the upstream proxy of `--mode upstream:` if there is one."""
    server = connection.Server(address=(request.host, request.port), sni=request.pretty_host, tls=True, alpn_offers=[b"http/1.1"])
    if proxy := upstream_proxy():
        server.via = proxy
    return server


def connect_request(server: connection.Server) -> http.HTTPFlow:
    """The CONNECT mitmproxy sends an HTTP upstream proxy, for the `http_connect_upstream` hook."""
    assert server.address
    host, port = server.address
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = http.Headers()
    if ctx.options.http_connect_send_host_header:
        headers["Host"] = authority
    tunnel = connection.Server(address=server.via[1] if server.via else None)
    flow = http.HTTPFlow(connection.Client(peername=("", 0), sockname=("", 0)), tunnel)
    now = time.time()
    flow.request = http.Request(host, port, b"CONNECT", b"", authority.encode(), b"", b"HTTP/1.1", headers, b"", None, now, now)
    return flow


# hubcache's other requests: through mitmproxy's core


class _ReplayHandler(ReplayHandler):
    """A client replay whose response body goes where `sink` says."""

    def __init__(self, flow: http.HTTPFlow, sink: Sink | None):
        super().__init__(flow, ctx.options)
        self.sink = sink

    async def handle_hook(self, hook: commands.StartHook) -> None:
        await super().handle_hook(hook)
        if self.sink and isinstance(hook, http_layer.HttpResponseHeadersHook):
            take(hook.flow, self.sink)


class Replay:
    """A request through mitmproxy's proxy core, like a client replay; `task` ends with it. With
    a `sink`, the body goes where it says (see `take`)."""

    def __init__(self, flow: http.HTTPFlow, sink: Sink | None = None):
        self.handler = _ReplayHandler(flow, sink)
        self.task = asyncio.ensure_future(self.handler.replay())

    def cancel(self, reason: str) -> None:
        for io in self.handler.transports.values():
            if io.handler:
                io.handler.cancel(reason)
        self.task.cancel()


def take(flow: http.HTTPFlow, sink: Sink) -> None:
    """Once the responseheaders hook ran: the body goes where `sink` says, not through an addon."""
    if flow.response is not None and not flow.error and (stream := sink(flow)) is not None:
        # mitmproxy's annotation asks for bytes in and out; the fetcher gives bytearrays and reads nothing back.
        flow.response.stream = cast(Any, stream)


# The loggers of mitmproxy's connection lines (connect, disconnect, streaming: INFO), and of its
# client replay, which carries hubcache's own requests.
FLOW_LOGGERS = ("mitmproxy.proxy", "mitmproxy.addons.clientplayback")
# Bytes of a request head the proxy reads (mitmproxy alone reads any): a registry client's are a
# few KB, a token the most of it.
MAX_HEAD = 64 * 1024
# Streams an HTTP/2 client may reset (before their answer): at once, and then a second.
RESETS = (100, 10)


# the `mode` option


def upstream_proxy() -> server_spec.ServerSpec | None:
    """The upstream proxy of `--mode upstream:` (the first mode), which mitmproxy's core sends its
    requests through, and hubcache's own too."""
    modes = ctx.options.mode
    if modes and modes[0].startswith("upstream:"):
        mode = mode_specs.ProxyMode.parse(modes[0])
        assert isinstance(mode, mode_specs.UpstreamMode)
        return (mode.scheme, mode.address)
    return None


def replace_listener(old: str | None, new: str | None) -> None:
    """Replace the listener of mode `old` (if any) with one of mode `new` (if any)."""
    modes = [m for m in ctx.options.mode if m != old]
    if new:
        modes.append(new)
    if modes != list(ctx.options.mode):
        ctx.options.mode = modes


# mitmproxy's own addons


def next_layer(nextlayer: layer.NextLayer) -> None:
    """Let mitmproxy's `nextlayer` addon decide the layer (it runs after hubcache's addons)."""
    ctx.master.addons.get("nextlayer").next_layer(nextlayer)


async def start_listeners() -> bool:
    """Start the listeners of the `mode` option that are not up yet; False if one cannot listen."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return not proxyserver or await proxyserver.setup_servers()


def listen_addrs() -> list[tuple]:
    """The addresses mitmproxy's listeners are bound to."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.listen_addrs() if proxyserver else []


def regular_listen_addrs() -> list[tuple]:
    """The addresses of mitmproxy's first regular (explicit proxy) listener that is up."""
    for server in ctx.master.addons.get("proxyserver").servers:
        if server.mode.type_name == "regular" and server.listen_addrs:
            return list(server.listen_addrs)
    return []


def certstore() -> certs.CertStore:
    """mitmproxy's certificate store: its CA, and the certificates it issues."""
    return ctx.master.addons.get("tlsconfig").certstore


def tls_start_client(tls_start: tls.TlsData) -> None:
    """Let mitmproxy's `tlsconfig` build a client connection (its versions, ciphers, ALPN), when
    hubcache's addon runs first (script addons run before mitmproxy's own)."""
    ctx.master.addons.get("tlsconfig").tls_start_client(tls_start)


# request bodies hubcache refuses (mitm/bodies.py): mitmproxy's HTTP layer, with a stream of hubcache's


def http_after_interception(nextlayer: layer.NextLayer) -> None:
    """What a client sends inside TLS hubcache intercepted is read as HTTP: mitmproxy relays
    bytes that do not look like HTTP as they come (its `rawtcp`), which would carry them to the
    registry past every hook. A head that is none then gets a 400, like any malformed one."""
    if isinstance(nextlayer.layer, tcp_layer.TCPLayer) and any(isinstance(below, tls_layer.ClientTLSLayer) for below in nextlayer.context.layers):
        nextlayer.layer = http_layer.HttpLayer(nextlayer.context, http_layer.HTTPMode.transparent)


def guard(top: layer.Layer | None) -> None:
    """Give the HTTP layers of a freshly decided layer stack hubcache's streams."""
    current: object = top
    while current is not None:
        if type(current) is http_layer.HttpLayer:
            current.__class__ = _GuardedLayer
        current = getattr(current, "child_layer", None)


class _GuardedLayer(http_layer.HttpLayer):
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super()._handle_event(event)
        if isinstance(event, events.Start):
            server = self.connections.get(self.context.client)
            if type(server) is http1_layer.Http1Server and server.state == server.read_headers:
                server.__class__ = _Http1Server
                server.state = server.read_headers
            elif type(server) is http2_layer.Http2Server:
                server.__class__ = _Http2Server

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        self.streams[stream_id] = _Stream(self.context.fork(), stream_id)
        yield from self.event_to_child(self.streams[stream_id], events.Start())


class _Http1Server(http1_layer.Http1Server):
    """mitmproxy's HTTP/1 server side, except that a request head (a CONNECT's, a registry
    request's) still unfinished after MAX_HEAD bytes is refused with 431 and its connection
    closed (mitmproxy alone buffers a head without end), and that the errors mitmproxy answers
    itself (a head it cannot read, a request it cannot pass on) are registry errors, not its
    HTML page."""

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        for command in super().read_headers(event):
            if isinstance(command, commands.SendData):  # mitmproxy's page for a head it cannot read
                command = commands.SendData(self.conn, _error_response(400, "the request head is malformed"))
            yield command
        if self.state == self.read_headers and len(self.buf) > MAX_HEAD:
            who = self.conn.peername[0] if self.conn.peername else "a client"
            yield commands.Log(f"{who}: request head over {MAX_HEAD} bytes: refused", logging.WARNING)
            yield commands.SendData(self.conn, _error_response(431, f"a request head is {MAX_HEAD} bytes at most"))
            yield commands.CloseConnection(self.conn)
            self.buf = type(self.buf)()  # what it sent is dropped now, not with the connection
            self.state = self.done

    def send(self, event: http_layer.HttpEvent) -> layer.CommandGenerator[None]:
        for command in super().send(event):
            if isinstance(event, http_layer.ResponseProtocolError) and isinstance(command, commands.SendData):
                status = event.code.http_status_code()
                assert status is not None  # mitmproxy writes no page for an error without a status
                command = commands.SendData(self.conn, _error_response(status, event.message))
            yield command


class _Http2Server(http2_layer.Http2Server):
    """mitmproxy's HTTP/2 server side, except that a client that resets streams faster than
    RESETS allows gets GOAWAY (ENHANCE_YOUR_CALM) and its connection closed. Each stream
    is a request whose hooks run after its reset, and mitmproxy alone reads resets as fast as a
    client sends them (HTTP/2 "rapid reset": 20 000 streams in 2 s cost the proxy 7 s of CPU, and
    a few seconds of it kept it busy for minutes)."""

    _allowance: float = RESETS[0]
    _counted_at: float | None = None

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        if isinstance(event, h2.events.StreamReset) and event.remote_reset:  # answered or not: its hooks ran
            burst, rate = RESETS
            now = time.monotonic()
            if self._counted_at is not None:
                self._allowance = min(burst, self._allowance + (now - self._counted_at) * rate)
            self._counted_at = now
            self._allowance -= 1
            if self._allowance < 0:
                why = f"HTTP/2 streams reset faster than {burst} at once, {rate} a second"
                who = self.conn.peername[0] if self.conn.peername else "a client"
                yield commands.Log(f"{who}: {why}: connection closed", logging.WARNING)
                yield from self.protocol_error(why, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                return True
        return (yield from super().handle_h2_event(event))


def _error_response(status: int, message: str) -> bytes:
    """A registry error of `status` that closes its connection: UNAVAILABLE for a 5xx (the
    gateway's), else UNSUPPORTED."""
    code = protocol.ErrorCode.UPSTREAM_FAILED if status >= 500 else protocol.ErrorCode.UNSUPPORTED_REQUEST
    body = protocol.error_body(code, message)
    return assemble_response(http.Response.make(status, body, {**protocol.error_headers(len(body)), "Connection": "close"}))


def _chunked_for_http1(request: http.Request, server: connection.Server) -> None:
    """An HTTP/2 or 3 request whose body states no length, about to go to an HTTP/1 server,
    is sent chunked."""
    http1 = server.alpn in (None, b"", b"http/1.1", b"http/1.0")
    if (request.is_http2 or request.is_http3) and http1 and "content-length" not in request.headers:
        request.headers["transfer-encoding"] = "chunked"


# connections closed while their reader waits for the event lock


_handle_connection = proxy_server.ConnectionHandler.handle_connection


async def _closing_handle_connection(self: proxy_server.ConnectionHandler, conn: connection.Connection) -> None:
    """mitmproxy's reading loop of a connection, except that one cancelled while it waits for
    the handler's event lock is closed too. A layer closes a connection from whichever task runs
    it; when that is a hook's (a head refused as the layer after TLS is decided) while the
    connection's own reader waits for the lock with the client's next bytes, mitmproxy's loop
    lets the cancellation out before its cleanup: the socket stayed open, unread, holding a
    descriptor and the client's bytes in its buffers, after mitmproxy had said the client was gone."""
    try:
        await _handle_connection(self, conn)
    except asyncio.CancelledError:
        io = self.transports.get(conn)
        if io is not None and io.handler is asyncio.current_task():  # mitmproxy's cleanup pops it
            conn.state = connection.ConnectionState.CLOSED
            try:
                await self.server_event(events.ConnectionClosed(conn))
            finally:
                self.transports.pop(conn, None)
                if io.writer is not None:
                    io.writer.close()
        raise


def close_cancelled_connections() -> None:
    """Every connection mitmproxy's handlers read is closed when cancelled (once per process)."""
    proxy_server.ConnectionHandler.handle_connection = _closing_handle_connection  # type: ignore[method-assign,assignment]


class _Stream(http_layer.HttpStream):
    """mitmproxy's stream, except that a request marked `bodies.takes_none` never has its body
    read, and that an HTTP/2 body of no stated length goes to an HTTP/1 server chunked."""

    _linger: commands.RequestWakeup | None = None

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and event.command is self._linger:
            yield commands.CloseConnection(self.context.client)
        else:
            yield from super()._handle_event(event)

    def state_wait_for_request_headers(self, event: http_layer.RequestHeaders) -> layer.CommandGenerator[None]:
        yield from super().state_wait_for_request_headers(event)
        # After the requestheaders hook: a body is still to come unless END_STREAM said otherwise.
        if event.end_stream or not bodies.refuses_body(self.flow):
            return
        if self.client_state != self.state_consume_request_body:
            return  # killed or failed already
        if bodies.announces_body(self.flow.request):
            yield from self._refuse()
        else:
            self.client_state = self.state_expect_no_body

    def start_request_stream(self) -> layer.CommandGenerator[None]:
        # mitmproxy's, with a length for HTTP/1: it writes an HTTP/2 request's body that states
        # no length as it comes, which an HTTP/1.1 server reads as the next request (smuggled).
        stream = super().start_request_stream()
        answer = None
        try:
            while True:
                command = stream.send(answer)
                if isinstance(command, http_layer.SendHttp) and isinstance(command.event, http_layer.RequestHeaders):
                    _chunked_for_http1(command.event.request, self.context.server)
                answer = yield command
        except StopIteration:
            return

    def state_expect_no_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        """HTTP/2 without a length: the end of the stream, or data that is refused."""
        if isinstance(event, http_layer.RequestEndOfMessage):
            self.client_state = self.state_consume_request_body
            yield from self.client_state(event)
        elif not (isinstance(event, http_layer.RequestData) and not event.data):
            yield from self._refuse()

    def _refuse(self) -> layer.CommandGenerator[None]:
        flow = self.flow
        # Whatever the client still sends is dropped as it comes, never kept.
        self.client_state = self.state_errored
        bodies.refuse(flow)
        yield http_layer.HttpResponseHeadersHook(flow)
        yield from self.send_response()
        yield http_layer.SendHttp(http_layer.ResponseEndOfMessage(self.stream_id), self.context.client)
        flow.live = False
        yield http_layer.DropStream(self.stream_id)
        self._linger = commands.RequestWakeup(bodies.LINGER)
        yield self._linger
