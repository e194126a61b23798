"""A fill's request off the event loop (upstream/fetcher.py), against a real TLS server on loopback: the
bytes arrive on another thread, mitmproxy's hooks decide and see the exchange in its core's order,
its TLS settings hold, and every way the answer can break ends as the same UpstreamError."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.addons.upstream_auth import UpstreamAuth
from mitmproxy.test import taddons, tflow
from tests.support.pki import TestCA

from hubcache.mitm.flows import Mark
from hubcache.proxy.interception import UpstreamOverride
from hubcache.upstream import client as upstream

BODY = os.urandom(3 * 1024 * 1024 + 17)  # more than one chunk
LARGE_ERROR = os.urandom(2 * 1024 * 1024 + 5)  # an answer other than the blob, more than one chunk
HOST = "registry.test"  # resolved by upstream_map only
PAUSE_AT = 300_000  # more than one socket read: the pause falls inside a chunk being gathered


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    release = threading.Event()

    def do_GET(self) -> None:
        self.server.requests.append((self.path, dict(self.headers)))  # type: ignore[attr-defined]
        if self.path == "/blob":
            self._head(200, {"Content-Length": str(len(BODY))})
            self.wfile.write(BODY)
        elif self.path == "/chunked":
            self._head(200, {"Transfer-Encoding": "chunked"})
            for start in range(0, len(BODY), 1_000_000):
                part = BODY[start : start + 1_000_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/short":
            self._head(200, {"Content-Length": str(len(BODY)), "Connection": "close"})
            self.wfile.write(BODY[:1000])
            self.close_connection = True
        elif self.path == "/stall":
            self._head(200, {"Content-Length": str(len(BODY))})
            self.wfile.write(BODY[:1000])
            self.wfile.flush()
            self.release.wait(30)
        elif self.path == "/pause":
            self._head(200, {"Content-Length": str(len(BODY))})
            self.wfile.write(BODY[:PAUSE_AT])
            self.wfile.flush()
            self.release.wait(30)
            self.wfile.write(BODY[PAUSE_AT:])
        elif self.path == "/large-error":
            self._head(404, {"Content-Length": str(len(LARGE_ERROR))})
            self.wfile.write(LARGE_ERROR)
        elif self.path == "/garbage":
            self.wfile.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            self.close_connection = True
        elif self.path == "/huge-head":
            self._head(200, {"X-Filler": "x" * 100_000, "Content-Length": "0"})
            self.close_connection = True
        else:
            self._head(404, {"Content-Length": "9"})
            self.wfile.write(b"not found")

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def server(ca) -> Iterator[ThreadingHTTPServer]:
    cert, key = ca.issue(HOST, [HOST])
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests = []  # type: ignore[attr-defined]
    httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    Handler.release.clear()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    Handler.release.set()
    httpd.shutdown()
    httpd.server_close()


class Hooks:
    """Records the hooks mitmproxy would run, and takes the body the way a fill does: through a
    stream callable set in `responseheaders`, noting the thread each chunk arrived on."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.chunks: list[tuple[bytes, int]] = []
        self.wanted = 1
        self.arrived = threading.Event()  # set once `wanted` bytes came

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.seen.append("requestheaders")

    def request(self, flow: http.HTTPFlow) -> None:
        self.seen.append("request")

    def server_connect(self, data) -> None:
        self.seen.append("server_connect")

    def server_connect_error(self, data) -> None:
        self.seen.append("server_connect_error")

    def tls_start_server(self, data) -> None:
        self.seen.append("tls_start_server")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.seen.append("responseheaders")
        assert flow.response
        if flow.response.status_code == 200:
            flow.response.stream = self._take

    def _take(self, data: bytes | memoryview) -> list[bytes]:
        # Taken before returning, as every stream callable must: the fetcher reads into it again.
        self.chunks.append((bytes(data), threading.get_ident()))
        if len(self.body) >= self.wanted:
            self.arrived.set()
        return []

    def response(self, flow: http.HTTPFlow) -> None:
        self.seen.append("response")

    def error(self, flow: http.HTTPFlow) -> None:
        self.seen.append("error")

    @property
    def body(self) -> bytes:
        return b"".join(data for data, _ in self.chunks)


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def tctx(tmp_path: Path, ca: TestCA, server: ThreadingHTTPServer, hooks: Hooks) -> Iterator[taddons.context]:
    tls = TlsConfig()
    with taddons.context(tls, UpstreamOverride(), upstream.BoundedAnswers(), hooks) as tctx:
        tctx.configure(tls, confdir=str(tmp_path / "mitmproxy"))
        tctx.options.update(
            ssl_verify_upstream_trusted_ca=str(ca.cert_path),
            upstream_map=[f"{HOST}=127.0.0.1:{server.server_address[1]}"],
        )
        yield tctx


def fill_flow(path: str) -> http.HTTPFlow:
    like = tflow.tflow()
    request = http.Request.make("GET", f"https://{HOST}{path}", headers={"Authorization": "Bearer t"})
    flow = upstream.subrequest(like, request)
    flow.metadata[Mark.FILL] = "sha256:" + hashlib.sha256(BODY).hexdigest()
    return flow


async def answered(flow: http.HTTPFlow, idle: float = 10) -> http.Response:
    """The fill's answer; getting none (it went elsewhere, or never came) fails the test."""
    try:
        return await upstream.Upstream().run(flow, idle)
    except upstream.UpstreamError as e:
        pytest.fail(f"the fill had no answer: {e}")


async def test_the_body_arrives_off_the_event_loop_with_every_hook_in_order(tctx, hooks, server):
    flow = fill_flow("/blob")
    response = await answered(flow)
    assert response.status_code == 200
    assert hooks.body == BODY
    assert hooks.chunks[-1][0] == b"", "the end is signalled to the stream callable, as mitmproxy's core does"
    assert len(hooks.chunks) < 10, "bytes are handed over in large chunks"
    assert {thread for _, thread in hooks.chunks} == {hooks.chunks[0][1]} != {threading.get_ident()}
    assert hooks.seen == ["requestheaders", "request", "server_connect", "tls_start_server", "responseheaders", "response"]
    (path, headers), = server.requests
    assert path == "/blob" and headers["Host"] == HOST and headers["Authorization"] == "Bearer t"


async def test_bytes_before_a_pause_are_handed_over_while_upstream_pauses(tctx, hooks):
    """The clients streaming a fill read its file: what came must not wait for what comes next."""
    hooks.wanted = PAUSE_AT
    fetch = asyncio.ensure_future(upstream.Upstream().run(fill_flow("/pause"), 10))
    assert await asyncio.to_thread(hooks.arrived.wait, 10)
    assert hooks.body == BODY[:PAUSE_AT]  # upstream is still paused
    Handler.release.set()
    assert (await fetch).status_code == 200
    assert hooks.body == BODY


@pytest.fixture
def high_file_numbers() -> Iterator[None]:
    """Over a thousand files open, so that the next socket's number is above 1023 (where select(2)
    cannot go), as in a proxy holding many client connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit of open files ({hard}) is below 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    files = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in files:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_fill_waits_for_upstream_on_a_socket_numbered_above_1023(tctx, hooks, high_file_numbers):
    hooks.wanted = PAUSE_AT
    fetch = asyncio.ensure_future(upstream.Upstream().run(fill_flow("/pause"), 10))
    assert await asyncio.to_thread(hooks.arrived.wait, 10)
    Handler.release.set()
    assert (await fetch).status_code == 200
    assert hooks.body == BODY


async def test_a_chunked_body_is_decoded(tctx, hooks):
    assert (await upstream.Upstream().run(fill_flow("/chunked"), 10)).status_code == 200
    assert hooks.body == BODY


async def test_an_answer_other_than_the_blob_is_read_whole(tctx, hooks):
    response = await upstream.Upstream().run(fill_flow("/missing"), 10)
    assert (response.status_code, response.content) == (404, b"not found")
    assert hooks.chunks == []


async def test_a_large_answer_other_than_the_blob_is_read_whole_across_chunks(tctx, hooks):
    """Its body is kept (upstream.BoundedAnswers) while the fetcher reads the next chunk into the
    same buffer."""
    response = await upstream.Upstream().run(fill_flow("/large-error"), 10)
    assert response.status_code == 404
    # Compared by digest: pytest's diff of two different megabytes would take minutes to write.
    assert hashlib.sha256(response.content or b"").hexdigest() == hashlib.sha256(LARGE_ERROR).hexdigest()


async def test_a_body_cut_short_is_no_answer(tctx, hooks):
    with pytest.raises(upstream.Unreachable, match="broke off"):
        await upstream.Upstream().run(fill_flow("/short"), 10)
    assert hooks.seen[-1] == "error"
    assert len(hooks.body) < len(BODY)


async def test_a_stalled_body_is_cut_after_the_idle_timeout(tctx, hooks):
    flow = fill_flow("/stall")
    with pytest.raises(upstream.Silent):
        await upstream.Upstream().run(flow, 0.5, lambda: 0.0)


async def test_an_untrusted_upstream_certificate_is_refused(tctx, hooks, tmp_path):
    other = TestCA(tmp_path / "other")
    tctx.options.update(ssl_verify_upstream_trusted_ca=str(other.cert_path))
    with pytest.raises(upstream.Unreachable, match="certificate verify failed"):
        await upstream.Upstream().run(fill_flow("/blob"), 10)
    assert hooks.chunks == []
    # The connection opened: a TLS failure is not the host being down (upstream/circuits.py).
    assert "server_connect_error" not in hooks.seen and hooks.seen[-1] == "error"


async def test_ssl_insecure_accepts_it(tctx, hooks, tmp_path):
    other = TestCA(tmp_path / "other")
    tctx.options.update(ssl_verify_upstream_trusted_ca=str(other.cert_path), ssl_insecure=True)
    assert (await upstream.Upstream().run(fill_flow("/blob"), 10)).status_code == 200
    assert hooks.body == BODY


async def test_without_upstream_map_the_name_is_resolved_by_the_system(tctx, hooks):
    tctx.options.update(upstream_map=[])
    with pytest.raises(upstream.Unreachable):
        await upstream.Upstream().run(fill_flow("/blob"), 10)  # registry.test resolves nowhere
    assert hooks.chunks == []
    assert hooks.seen[-2:] == ["server_connect_error", "error"]


class ConnectProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy that only tunnels (CONNECT), and remembers the CONNECT requests' heads."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), TunnelHandler)
        self.heads: list[bytes] = []


class TunnelHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            if not (data := self.request.recv(4096)):
                return
            head += data
        self.server.heads.append(head)  # type: ignore[attr-defined]
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        with socket.create_connection((host, int(port))) as target:
            self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            pipe = threading.Thread(target=_pipe, args=(target, self.request), daemon=True)
            pipe.start()
            _pipe(self.request, target)
            pipe.join()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


async def test_an_upstream_proxy_carries_it_with_its_credentials_to_the_mapped_address(tctx, hooks, server):
    proxy = ConnectProxy()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        tctx.master.addons.add(UpstreamAuth())
        tctx.options.update(mode=[f"upstream:http://127.0.0.1:{proxy.server_address[1]}"], upstream_auth="user:secret")
        assert (await answered(fill_flow("/blob"))).status_code == 200
        assert hooks.body == BODY
        (head,) = proxy.heads
        port = server.server_address[1]
        assert head.startswith(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n".encode()), head  # upstream_map applied
        assert b"Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=" in head
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.parametrize("path", ["/garbage", "/huge-head"])
async def test_an_answer_that_is_not_http_is_no_answer(tctx, hooks, path):
    with pytest.raises(upstream.Unreachable, match="unreadable"):
        await upstream.Upstream().run(fill_flow(path), 10)
    assert hooks.chunks == [] and hooks.seen[-1] == "error"


async def test_an_error_nobody_expected_on_the_thread_ends_the_exchange(tctx, hooks, caplog):
    def broken(data: bytes) -> list[bytes]:
        raise ValueError("a bug in the stream callable")

    class Broken:
        def responseheaders(self, flow: http.HTTPFlow) -> None:
            assert flow.response
            flow.response.stream = broken

    tctx.master.addons.add(Broken())  # after Hooks: its stream callable is the one used
    with pytest.raises(upstream.Unreachable, match="a bug in the stream callable"):
        await upstream.Upstream().run(fill_flow("/blob"), 10)
    assert hooks.seen[-1] == "error"
    assert "failed unexpectedly" in caplog.text


async def test_a_sink_passed_in_takes_the_body_once_the_hooks_ran(tctx, hooks):
    """A fill's body reaches it from the fetcher directly, whatever stream callable an addon set."""
    taken: list[bytes] = []

    def sink(flow: http.HTTPFlow):
        assert hooks.seen[-1] == "responseheaders"
        return lambda data: taken.append(bytes(data))

    assert (await upstream.Upstream().run(fill_flow("/blob"), 10, sink=sink)).status_code == 200
    assert b"".join(taken) == BODY and taken[-1] == b""
    assert hooks.chunks == [] and hooks.seen[-1] == "response"
