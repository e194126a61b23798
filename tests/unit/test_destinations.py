"""Where clients of the proxy may go (addon/destinations.py), and what passes through streamed
(hosts.Passthrough): unit tests with mitmproxy's test helpers."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from mitmproxy import connection, exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow, tutils

from hubcache.blobhost import BlobHost
from hubcache.blobserver import BLOB_HOST
from hubcache.destinations import Destinations, Refused
from hubcache.hosts import Interception, Passthrough, UpstreamOverride
from hubcache.listeners import BoundedThreads


@pytest.fixture
def guard():
    override = UpstreamOverride()
    blobs = BlobHost()
    destinations = Destinations(override, blobs)
    destinations.own_ports.append(lambda: [3129])
    with taddons.context(Proxyserver(), override, blobs, destinations) as tctx:
        tctx.configure(destinations, listen_host="0.0.0.0")
        yield tctx, destinations, override


def connect(host: str, port: int) -> http.HTTPFlow:
    f = tflow.tflow()
    f.request = tutils.treq(method=b"CONNECT", host=host, port=port, path=b"", authority=f"{host}:{port}".encode())
    return f


@pytest.mark.parametrize(
    "host, why",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("localhost", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
    ],
)
async def test_serving_a_network_refuses_local_destinations(guard, host, why):
    _, destinations, _ = guard
    with pytest.raises(Refused, match=why):
        await destinations.check(host, 6379)
    f = connect(host, 6379)
    await destinations.http_connect(f)
    assert f.response.status_code == 403 and why.encode() in f.response.content


async def test_an_address_of_this_host_is_local(guard):
    _, destinations, _ = guard
    own = socket.gethostbyname(socket.gethostname())
    with pytest.raises(Refused):
        await destinations.check(own, 22)


async def test_other_destinations_pass_and_are_pinned(guard):
    tctx, destinations, _ = guard
    assert await destinations.check("192.0.2.7", 443) == "192.0.2.7"  # a literal: as named
    data = server_hooks.ServerConnectionHookData(server=connection.Server(address=("192.0.2.7", 443)), client=tflow.tclient_conn())
    await destinations.server_connect(data)
    assert data.server.address == ("192.0.2.7", 443) and data.server.error is None


async def test_a_refused_connection_is_never_opened(guard):
    _, destinations, _ = guard
    data = server_hooks.ServerConnectionHookData(server=connection.Server(address=("localhost", 6379)), client=tflow.tclient_conn())
    await destinations.server_connect(data)
    assert "loopback" in data.server.error


async def test_exceptions_the_operator_listed(guard):
    tctx, destinations, _ = guard
    tctx.configure(destinations, local_destinations_allowed=["127.0.0.1:5000", "[::1]", "169.254.0.0/16:80"])
    assert await destinations.check("127.0.0.1", 5000) == "127.0.0.1"
    assert await destinations.check("::1", 7) == "::1"
    assert await destinations.check("169.254.169.254", 80) == "169.254.169.254"
    for host, port in (("127.0.0.1", 5001), ("169.254.169.254", 443)):
        with pytest.raises(Refused):
            await destinations.check(host, port)


@pytest.mark.parametrize("bad", ["nonsense", "127.0.0.1:99999", "[::1]x", "10.0.0.0/99"])
def test_a_bad_exception_is_one_line(guard, bad):
    tctx, destinations, _ = guard
    with pytest.raises(exceptions.OptionsError, match="local_destinations_allowed"):
        tctx.configure(destinations, local_destinations_allowed=[bad])


async def test_loopback_is_allowed_on_loopback_but_never_hubcaches_own_listeners(guard):
    tctx, destinations, _ = guard
    tctx.configure(destinations, listen_host="127.0.0.1")
    assert await destinations.check("127.0.0.1", 6379) == "127.0.0.1"
    with pytest.raises(Refused, match="hubcache's own listener"):
        await destinations.check("localhost", 3129)
    tctx.configure(destinations, local_destinations="refuse")
    with pytest.raises(Refused, match="loopback"):
        await destinations.check("127.0.0.1", 6379)
    tctx.configure(destinations, local_destinations="allow", listen_host="0.0.0.0")
    assert await destinations.check("127.0.0.1", 6379) == "127.0.0.1"
    with pytest.raises(Refused, match="own listener"):
        await destinations.check("127.0.0.1", 3129)


async def test_names_hubcache_routes_itself_are_not_judged(guard):
    tctx, destinations, override = guard
    tctx.configure(override, upstream_map=["registry-1.docker.io=127.0.0.1:5000"])
    assert await destinations.check("registry-1.docker.io", 443) is None
    assert await destinations.check(BLOB_HOST, 443) is None


async def test_behind_an_upstream_proxy_only_literals_are_judged(guard):
    _, destinations, _ = guard
    assert await destinations.check("registry.example", 443, via_proxy=True) is None
    with pytest.raises(Refused):
        await destinations.check("localhost", 6379, via_proxy=True)


# Passthrough: bodies hubcache does not answer are streamed


def request_flow(method: str, host: str, headers: dict, scheme: str = "https") -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(method=method.encode(), host=host, port=443, scheme=scheme.encode(), headers=http.Headers(**headers), content=None))
    f.client_conn.sni = host
    return f


@pytest.mark.parametrize(
    "method, host, headers, streamed",
    [
        ("PUT", "example.com", {"content_length": "1000000000"}, True),
        ("POST", "example.com", {"transfer_encoding": "chunked"}, True),
        ("PATCH", "registry-1.docker.io", {"content_length": "5"}, True),  # a push: relayed as it comes
        ("GET", "example.com", {}, False),
        ("POST", "registry-1.docker.io", {"content_length": "0"}, False),
    ],
)
def test_request_bodies_are_streamed(method, host, headers, streamed):
    hosts = Interception()
    passthrough = Passthrough(hosts)
    with taddons.context(hosts, passthrough) as tctx:
        tctx.options.add_option("offline", bool, False, "declared by the cache")
        f = request_flow(method, host, headers)
        passthrough.requestheaders(f)
        assert bool(f.request.stream) is streamed and not f.error


def test_a_pull_with_a_body_is_refused():
    """hubcache answers pulls itself after reading the whole request: one with a body is cut."""
    hosts = Interception()
    passthrough = Passthrough(hosts)
    with taddons.context(hosts, passthrough):
        f = request_flow("GET", "registry-1.docker.io", {"content_length": "1000000000"})
        passthrough.requestheaders(f)
        assert f.error and not f.request.stream


def test_upstream_answers_are_streamed_and_hubcaches_own_are_not():
    hosts = Interception()
    passthrough = Passthrough(hosts)
    with taddons.context(hosts, passthrough):
        relayed = request_flow("GET", "example.com", {})
        relayed.response = tutils.tresp(content=None)
        passthrough.responseheaders(relayed)
        assert relayed.response.stream is True
        answered = request_flow("GET", "registry-1.docker.io", {})
        answered.response = http.Response.make(200, b"{}")
        passthrough.responseheaders(answered)
        assert not answered.response.stream


# The listeners' thread bound and idle timeout


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class _Bounded(BoundedThreads, HTTPServer):
    max_connections = 2
    idle_timeout = 1.0


def test_idle_connections_are_dropped_and_the_bound_holds_the_rest_back():
    server = _Bounded(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = server.server_address
    try:
        idle = [socket.create_connection(address) for _ in range(2)]  # every slot, saying nothing
        waiting = socket.create_connection(address)
        waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        waiting.settimeout(30)
        assert waiting.recv(1024).startswith(b"HTTP/1.1 200")
        # Served only once an idle connection was dropped: the bound held it back till then.
        assert any(_closed(sock) for sock in idle)
        for sock in idle:
            sock.settimeout(30)
            assert sock.recv(1) == b"", "the idle connection was closed by the server"
            sock.close()
        waiting.close()
    finally:
        server.shutdown()
        server.server_close()


def _closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)
