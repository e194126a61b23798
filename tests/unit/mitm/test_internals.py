"""What hubcache relies on of mitmproxy's internals (internals.py), pinned against the installed
mitmproxy: an upgrade that changes the hooks run for a request, the HTTP layer hubcache swaps a
stream into, or the addons it asks by name fails here, not in a pull."""

from __future__ import annotations

import asyncio
import inspect
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from mitmproxy import hooks as mitmproxy_hooks
from mitmproxy import options
from mitmproxy.addons import default_addons
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.addons.upstream_auth import UpstreamAuth
from mitmproxy.proxy import events, layer, mode_specs
from mitmproxy.proxy import server as proxy_server
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import _http1 as http1_layer
from mitmproxy.test import taddons
from tests.support.pki import TestCA
from tests.unit.upstream.test_fetcher import BODY, ConnectProxy, ca, fill_flow, server  # noqa: F401 (fixtures)

from hubcache.mitm import internals
from hubcache.proxy.interception import UpstreamOverride
from hubcache.upstream import client as upstream
from hubcache.upstream import fetcher

LIFECYCLE = {"load", "configure", "running", "done", "update", "add_log"}


class Recorder:
    """Records every hook mitmproxy runs for a connection or a request, in order."""

    def __init__(self) -> None:
        self.seen: list[str] = []


for _name in set(mitmproxy_hooks.all_hooks) - LIFECYCLE:
    setattr(Recorder, _name, (lambda name: lambda self, *args: self.seen.append(name))(_name))


@pytest.fixture
def tctx(tmp_path: Path, ca: TestCA, server) -> Iterator[taddons.context]:  # noqa: F811
    tls = TlsConfig()
    # Proxyserver declares the options mitmproxy's HTTP layer reads.
    with taddons.context(Proxyserver(), tls, UpstreamOverride(), upstream.BoundedAnswers(), UpstreamAuth()) as tctx:
        tctx.configure(tls, confdir=str(tmp_path / "mitmproxy"))
        tctx.options.update(
            ssl_verify_upstream_trusted_ca=str(ca.cert_path),
            upstream_map=[f"registry.test=127.0.0.1:{server.server_address[1]}"],
        )
        yield tctx


async def hooks_run(tctx: taddons.context, carrier) -> list[str]:
    """The hooks run for one fill request carried by `carrier` (mitmproxy's core, or the fetcher)."""
    recorder = Recorder()
    tctx.master.addons.add(recorder)
    try:
        await carrier(fill_flow("/blob"), 10).task
    finally:
        tctx.master.addons.remove(recorder)
    return recorder.seen


async def assert_same_hooks(tctx: taddons.context) -> tuple[list[str], list[str]]:
    core = await hooks_run(tctx, lambda flow, _: internals.Replay(flow))
    replayed = await hooks_run(tctx, fetcher.Exchange)
    assert set(internals.RUN) | set(internals.NOT_RUN) >= set(core), "mitmproxy runs a hook internals.py does not know of"
    if "server_connect_error" in replayed:
        # The fetcher makes its TLS connection object before it connects (on its thread).
        assert replayed.index("tls_start_server") < replayed.index("server_connect_error")
        replayed = [hook for hook in replayed if hook != "tls_start_server"]
    assert replayed == [hook for hook in core if hook in internals.RUN], "the fetcher runs other hooks, or in another order"
    return core, replayed


async def test_a_fill_runs_the_hooks_mitmproxy_runs_for_a_request_in_its_order(tctx):
    core, _ = await assert_same_hooks(tctx)
    assert core[:4] == ["requestheaders", "request", "server_connect", "server_connected"]
    assert "response" in core


async def test_so_it_does_through_an_upstream_proxy(tctx):
    proxy = ConnectProxy()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        tctx.options.update(mode=[f"upstream:http://127.0.0.1:{proxy.server_address[1]}"])
        assert "http_connect_upstream" in (await assert_same_hooks(tctx))[1]
    finally:
        proxy.shutdown()
        proxy.server_close()


async def test_so_it_does_when_the_connection_fails(tctx):
    tctx.options.update(upstream_map=[])  # registry.test resolves nowhere
    assert (await assert_same_hooks(tctx))[1][-2:] == ["server_connect_error", "error"]


async def test_a_replay_hands_the_body_to_its_sink(tctx):
    """hubcache's requests through mitmproxy's core: the body goes where the sink says too."""
    taken: list[bytes] = []
    flow = fill_flow("/blob")
    await internals.Replay(flow, lambda _: lambda data: taken.append(bytes(data)) or b"").task
    assert flow.response is not None and flow.response.status_code == 200
    assert b"".join(taken) == BODY


def test_the_hooks_run_are_mitmproxys():
    assert set(internals.RUN) | set(internals.NOT_RUN) <= set(mitmproxy_hooks.all_hooks)
    assert internals.HttpConnectUpstreamHook.name == "http_connect_upstream"


def test_the_upstream_proxy_is_the_first_mode_of_upstream_kind():
    with taddons.context() as tctx:
        assert internals.upstream_proxy() is None
        tctx.options.update(mode=["upstream:http://127.0.0.1:3128", "regular"])
        assert internals.upstream_proxy() == ("http", ("127.0.0.1", 3128))
        tctx.options.update(mode=["regular", "upstream:http://127.0.0.1:3128"])
        assert internals.upstream_proxy() is None


def test_the_guarded_layer_makes_its_streams_as_mitmproxys_does():
    """`_GuardedLayer.make_stream` is mitmproxy's, with hubcache's stream class."""
    theirs = textwrap.dedent(inspect.getsource(http_layer.HttpLayer.make_stream))
    assert theirs == (
        "def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:\n"
        "    ctx = self.context.fork()\n"
        "    self.streams[stream_id] = HttpStream(ctx, stream_id)\n"
        "    yield from self.event_to_child(self.streams[stream_id], events.Start())\n"
    ), "mitmproxy makes its HTTP streams differently now: internals._GuardedLayer must follow"
    guarded = internals._GuardedLayer
    assert guarded.__mro__[1] is http_layer.HttpLayer and internals._Stream.__mro__[1] is http_layer.HttpStream


def test_the_http1_head_reading_hubcache_bounds_is_mitmproxys():
    """`_Http1Server` reads heads as mitmproxy's Http1Server does, from the buffer it fills, in the
    state that `start` and each finished exchange set, and gives up the same way."""
    theirs = http1_layer.Http1Server
    assert internals._Http1Server.__mro__[1] is theirs
    assert list(inspect.signature(theirs.read_headers).parameters) == ["self", "event"]
    for needed in ("self.state = self.read_headers", "self.buf += event.data", "self.state = self.done"):
        assert needed in inspect.getsource(http1_layer), f"mitmproxy's HTTP/1 layer no longer has {needed!r}"
    assert "self.buf.maybe_extract_lines()" in inspect.getsource(theirs.read_headers)
    # The two places its HTML error page is written, which hubcache's registry errors replace.
    assert "commands.SendData(self.conn, make_error_response(400, str(e)))" in inspect.getsource(theirs.read_headers)
    assert "make_error_response(status, event.message)" in inspect.getsource(theirs.send)
    assert inspect.getsource(http1_layer).count("make_error_response(") == 3  # those two and its definition
    assert "self.connections.setdefault(self.context.client, http_conn)" in inspect.getsource(http_layer.HttpLayer._handle_event)


def test_the_stream_states_hubcache_relies_on_are_there():
    stream = http_layer.HttpStream
    for state in ("state_wait_for_request_headers", "state_consume_request_body", "state_errored", "send_response", "_handle_event"):
        assert callable(getattr(stream, state, None)), state
    assert list(inspect.signature(stream.state_wait_for_request_headers).parameters) == ["self", "event"]
    assert "end_stream" in inspect.signature(http_layer.RequestHeaders).parameters


def test_the_flow_loggers_are_those_mitmproxys_connection_lines_and_replays_log_to():
    import mitmproxy.addons.clientplayback
    import mitmproxy.proxy.server

    connections, replays = internals.FLOW_LOGGERS
    assert mitmproxy.proxy.server.logger.name.startswith(connections + ".")
    assert mitmproxy.addons.clientplayback.logger.name == replays


def test_the_addons_asked_by_name_are_mitmproxys_with_what_is_asked_of_them():
    addons = {type(addon).__name__.lower(): addon for addon in default_addons()}
    assert callable(addons["nextlayer"].next_layer)
    assert callable(addons["proxyserver"].setup_servers) and callable(addons["proxyserver"].listen_addrs)
    assert hasattr(addons["proxyserver"], "servers")
    assert callable(addons["tlsconfig"].tls_start_client)
    assert "certstore" in TlsConfig.__annotations__



class _WatchedLock(asyncio.Lock):
    """A handler's event lock that says when the reader of its client's connection waits for it."""

    def __init__(self, handler: proxy_server.ConnectionHandler) -> None:
        super().__init__()
        self.handler = handler
        self.reader_waits = asyncio.Event()

    async def acquire(self) -> Literal[True]:
        io = self.handler.transports.get(self.handler.client)
        if self.locked() and io is not None and asyncio.current_task() is io.handler:
            self.reader_waits.set()
        return await super().acquire()


class _Silent(layer.Layer):
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from ()


@pytest.fixture
def closing_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`close_cancelled_connections` installed for this test only."""
    monkeypatch.setattr(proxy_server.ConnectionHandler, "handle_connection", proxy_server.ConnectionHandler.handle_connection)
    internals.close_cancelled_connections()


async def test_a_connection_closed_while_its_reader_waits_for_the_event_lock_is_closed(closing_handlers):
    """A layer run by another task (a hook's) closes the client's connection while the client's
    reader, with the next bytes in, waits for the handler's event lock: the client sees the
    connection closed, and the handler lets go of it."""
    handlers: asyncio.Queue[proxy_server.SimpleConnectionHandler] = asyncio.Queue()
    done: list[asyncio.Task] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = proxy_server.SimpleConnectionHandler(
            reader, writer, options.Options(), mode_specs.ProxyMode.parse("regular"), {"next_layer": lambda nl: setattr(nl, "layer", _Silent(nl.context))}
        )
        handler._server_event_lock = _WatchedLock(handler)
        handlers.put_nowait(handler)
        done.append(asyncio.current_task())  # type: ignore[arg-type]
        await handler.handle_client()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
    handler = await asyncio.wait_for(handlers.get(), 10)
    try:
        lock = handler._server_event_lock
        assert isinstance(lock, _WatchedLock)
        async with lock:  # as a hook's task holds it while it runs the layers
            writer.write(b"the client's next bytes")
            await asyncio.wait_for(lock.reader_waits.wait(), 10)
            handler.close_connection(handler.client)  # a layer's CloseConnection, from that task
        try:
            closed = await asyncio.wait_for(reader.read(), 10)
        except TimeoutError:
            closed = None
        assert closed == b"", "the client's connection stayed open after mitmproxy let go of it"
        await asyncio.wait_for(asyncio.gather(*done), 10)
        assert handler.client not in handler.transports
    finally:
        for io in handler.transports.values():  # what a broken handler left open
            if io.writer is not None:
                io.writer.close()
        writer.close()
        listener.close()
