"""A body on a request hubcache answers itself is refused by hubcache's HTTP layer before it is read.

mitmproxy's own HTTP layer, guarded as `Passthrough.next_layer` guards it, driven with the bytes
a client sends (HTTP/1.1, and HTTP/2 framed by the h2 library as a client), its hooks answered
here as the addons would: the `requestheaders` hook marks the request as hubcache's own."""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h2.events
import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, context, events, layer
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode, HttpRequestHeadersHook, HttpRequestHook
from mitmproxy.test import taddons, tflow

from hubcache.mitm import bodies, internals
from hubcache.mitm.flows import Mark

HEAD = b"GET /v2/library/alpine/manifests/3.20 HTTP/1.1\r\nHost: registry-1.docker.io\r\n"


class Client:
    """A client connection into a guarded HTTP layer: what it sends, what the layer does."""

    def __init__(self, options, http2: bool = False, hubcaches: bool = True) -> None:
        ctx = context.Context(tflow.tclient_conn(), options)
        ctx.client.alpn = b"h2" if http2 else b"http/1.1"
        ctx.server = tflow.tserver_conn()
        self.layer: layer.Layer = HttpLayer(ctx, HTTPMode.transparent)
        internals.guard(self.layer)
        self.hubcaches = hubcaches
        self.commands: list[commands.Command] = []
        self.hooks: list[str] = []
        self._run(events.Start())

    def send(self, data: bytes) -> None:
        self._run(events.DataReceived(self.layer.context.client, data))

    def _run(self, event: events.Event) -> None:
        pending = [event]
        while pending:
            for command in self.layer.handle_event(pending.pop(0)):
                self.commands.append(command)
                if isinstance(command, commands.StartHook):
                    self.hooks.append(command.name)
                    if isinstance(command, HttpRequestHeadersHook) and self.hubcaches:
                        bodies.takes_none(command.flow)
                    pending.append(events.HookCompleted(command))

    @property
    def received(self) -> bytes:
        return b"".join(c.data for c in self.commands if isinstance(c, commands.SendData) and c.connection is self.layer.context.client)

    @property
    def closed(self) -> bool:
        return any(isinstance(c, commands.CloseConnection) and c.connection is self.layer.context.client for c in self.commands)

    def lingers_then_closes(self) -> None:
        """The close comes after LINGER (a close with the body unread would reset the connection,
        and a client still sending might miss the answer)."""
        assert not self.closed, "closed before the client could read its answer"
        wakeup = next(c for c in self.commands if isinstance(c, commands.RequestWakeup))
        assert wakeup.delay == bodies.LINGER
        self._run(events.Wakeup(wakeup))
        assert any(type(c) is commands.CloseConnection and c.connection is self.layer.context.client for c in self.commands)

    @property
    def asked_upstream(self) -> bool:
        return any(isinstance(c, commands.OpenConnection) for c in self.commands) or "request" in self.hooks


@pytest.fixture
def options():
    with taddons.context(Proxyserver()) as tctx:  # the proxy's options, as its layers read them
        yield tctx.options


def assert_refused(client: Client, answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    assert b"connection: close" in head.lower()
    assert not client.asked_upstream
    client.lingers_then_closes()


@pytest.mark.parametrize(
    "request_bytes",
    [
        HEAD + b"Content-Length: 3000000000\r\n\r\n" + b"x" * 1000,
        HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n",
        HEAD + b"Transfer-Encoding: chunked\r\n\r\n",  # nothing of the body sent yet: refused all the same
    ],
)
def test_an_http1_body_is_answered_413_and_the_connection_closed_before_it_is_read(options, request_bytes):
    client = Client(options)
    client.send(request_bytes)
    assert_refused(client, client.received)


def test_an_http1_request_without_a_body_is_served(options):
    client = Client(options)
    client.send(HEAD + b"\r\n")
    assert "request" in client.hooks and not client.closed


def test_a_body_on_a_request_hubcache_does_not_answer_is_left_to_mitmproxy(options):
    client = Client(options, hubcaches=False)
    client.send(HEAD + b"Content-Length: 5\r\n\r\nhello")
    assert "request" in client.hooks and b"413" not in client.received


class H2Client:
    """The client side of an HTTP/2 connection, framed by the h2 library."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()

    def request(self, headers: dict[str, str], end_stream: bool) -> bytes:
        pseudo = [(":method", "GET"), (":scheme", "https"), (":authority", "registry-1.docker.io"), (":path", "/v2/library/alpine/manifests/3.20")]
        self.conn.send_headers(1, pseudo + list(headers.items()), end_stream=end_stream)
        return self.conn.data_to_send()

    def data(self, data: bytes, end_stream: bool = False) -> bytes:
        self.conn.send_data(1, data, end_stream=end_stream)
        return self.conn.data_to_send()

    def answer(self, received: bytes) -> tuple[int, bytes, bool]:
        """(status, body, whether the stream ended) of stream 1."""
        status, body, ended = 0, b"", False
        for event in self.conn.receive_data(received):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
        return status, body, ended


@pytest.mark.parametrize("announced", [{}, {"content-length": "3000000000"}])
def test_an_http2_body_with_or_without_a_length_is_answered_413_and_the_connection_closed(options, announced):
    peer, client = H2Client(), Client(options, http2=True)
    client.send(peer.request(announced, end_stream=False))
    if not announced:
        assert not client.closed, "HTTP/2 without a length: the first DATA decides"
        client.send(peer.data(b"x" * 16384))
    status, body, ended = peer.answer(client.received)
    assert (status, ended) == (413, True)
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    assert not client.asked_upstream
    client.lingers_then_closes()


@pytest.mark.parametrize("framing", ["end on headers", "empty last data frame"])
def test_an_http2_request_without_a_body_is_served(options, framing):
    peer, client = H2Client(), Client(options, http2=True)
    if framing == "end on headers":
        client.send(peer.request({}, end_stream=True))
    else:
        client.send(peer.request({}, end_stream=False))
        client.send(peer.data(b"", end_stream=True))
    assert "request" in client.hooks and not client.closed
    assert Mark.NO_BODY in next(c.flow for c in client.commands if isinstance(c, HttpRequestHook)).metadata
