"""The blob server process, started by the BlobHost addon as the proxy starts it, over real TLS."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mitmproxy import connection, ctx
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons

from hubcache.blobserver import server as blobserver
from hubcache.blobserver.host import BlobHost
from hubcache.blobserver.server import BLOB_HOST
from hubcache.mitm import internals
from hubcache.options import CommonOptions
from hubcache.registry.protocol import digest_of
from hubcache.storage.folder import CacheFolder
from hubcache.storage.store import Store
from support.slowclients import SlowClients, client_hello

BLOB = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = digest_of(BLOB)


@dataclass
class Blobs:
    host: BlobHost
    store: Store
    ca: Path

    @property
    def secret(self) -> bytes:
        return self.host.secret


@pytest.fixture
async def blobs(tmp_path):
    host = BlobHost(internals.certstore)
    folder = CacheFolder()
    tlsconfig = TlsConfig()
    with taddons.context(Proxyserver(), tlsconfig, CommonOptions(), folder, host) as tctx:
        tctx.configure(tlsconfig, confdir=str(tmp_path / "conf"))
        tctx.options.update(cache_dir=str(tmp_path / "cache"))
        host.running()
        assert host.address, "the blob server started"
        assert folder.store
        yield Blobs(host, folder.store, tmp_path / "conf" / "mitmproxy-ca-cert.pem")
        host.done()
        folder.done()


def tunnel(blobs: Blobs, target: str = f"{BLOB_HOST}:443") -> tuple[socket.socket, bytes]:
    """A connection to the CONNECT listener, as mitmproxy's upstream mode opens it, and the answer."""
    sock = socket.create_connection(("127.0.0.1", blobs.host.tunnel_port), timeout=20)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    answer = b""
    while not answer.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        answer += byte
    return sock, answer


class Received:
    """The body bytes a client has had so far, to wait on."""

    def __init__(self) -> None:
        self.body = bytearray()
        self._grew = threading.Condition()

    def add(self, data: bytes) -> None:
        with self._grew:
            self.body += data
            self._grew.notify_all()

    def at_least(self, size: int, timeout: float = 20) -> int:
        """Wait until the client has `size` bytes or more; returns how many it has then."""
        with self._grew:
            assert self._grew.wait_for(lambda: len(self.body) >= size, timeout), f"the client has only {len(self.body)} of {size} bytes"
            return len(self.body)


def get(
    blobs: Blobs,
    path: str,
    headers: dict | None = None,
    method: str = "GET",
    transport: str = "tls",
    answered: threading.Event | None = None,
    received: Received | None = None,
):
    """A request to the blob server as a client reaches it: TLS for BLOB_HOST trusting the CA
    (directly, or through a CONNECT as in upstream proxy mode), or plain HTTP on its loopback port.
    `answered` is set once the response's headers came (the server has the blob open); `received`
    gets the body's bytes as they come."""
    if transport == "plain":
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", blobs.host.loopback_port, timeout=20)
    else:
        context = ssl.create_default_context(cafile=str(blobs.ca))
        conn = http.client.HTTPSConnection(BLOB_HOST, context=context, timeout=20)
        if transport == "tunnel":
            sock, answer = tunnel(blobs)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
        else:
            sock = socket.create_connection(blobs.host.address)
        conn.sock = context.wrap_socket(sock, server_hostname=BLOB_HOST)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        if answered:
            answered.set()
        try:
            if received is None:
                return response.status, response.headers, response.read()
            while data := response.read1(65536):
                received.add(data)
            return response.status, response.headers, bytes(received.body)
        except http.client.IncompleteRead as e:
            return response.status, response.headers, e
    finally:
        conn.close()


def put(store, data: bytes = BLOB, digest: str = DIGEST) -> None:
    writer = store.blob_writer(digest)
    writer.write(data)
    writer.commit()


def path_of(blobs, digest: str = DIGEST, **fill) -> str:
    return blobserver.signed_path(blobs.secret, digest, **fill)


TRANSPORTS = pytest.mark.parametrize("transport", ["tls", "plain", "tunnel"])


@TRANSPORTS
def test_a_cached_blob_with_ranges(blobs, transport):
    put(blobs.store)
    path = path_of(blobs)
    status, headers, body = get(blobs, path, transport=transport)
    assert (status, body) == (200, BLOB)
    assert headers["Docker-Content-Digest"] == DIGEST and headers["Content-Length"] == str(len(BLOB))
    status, headers, body = get(blobs, path, {"Range": "bytes=100-"}, transport=transport)
    assert (status, headers["Content-Range"], body) == (206, f"bytes 100-{len(BLOB) - 1}/{len(BLOB)}", BLOB[100:])
    status, _, body = get(blobs, path, {"Range": "bytes=5-9"}, transport=transport)
    assert (status, body) == (206, BLOB[5:10])
    status, headers, body = get(blobs, path, {"Range": f"bytes={len(BLOB)}-"}, transport=transport)
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(BLOB)}")
    assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
    status, headers, body = get(blobs, path, method="HEAD", transport=transport)
    assert (status, headers["Content-Length"], body) == (200, str(len(BLOB)), b"")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda p: p.replace("signature=", "signature=0"),
        lambda p: p.replace(DIGEST[7:15], "00000000"),
        lambda p: p.split("?")[0],
        lambda p: p + "&fill=1/tmpx/fill-y&size=5",
        lambda p: re.sub(r"expires=(\d+)", lambda m: f"expires={int(m.group(1)) + 86400}", p),  # a longer life
    ],
)
def test_only_urls_the_proxy_signed_are_served(blobs, mangle):
    put(blobs.store)
    status, _, body = get(blobs, mangle(path_of(blobs)))
    assert status == 403
    assert json.loads(body)["errors"][0]["code"] == "DENIED"


def test_an_expired_url_is_refused(blobs):
    """docs/how-it-works.md: URLs are signed for 10 minutes."""
    put(blobs.store)
    assert get(blobs, blobserver.signed_path(blobs.secret, DIGEST, now=time.time() - 540))[0] == 200
    old = blobserver.signed_path(blobs.secret, DIGEST, now=time.time() - 660)
    assert get(blobs, old)[0] == 403


def test_unknown_blob(blobs):
    status, _, body = get(blobs, path_of(blobs))
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


def start_fill(blobs, half: int):
    writer = blobs.store.blob_writer(DIGEST)
    writer.write(BLOB[:half])
    name = os.path.relpath(writer.path, blobs.store.directory / "tmp")
    return writer, path_of(blobs, fill=name, size=len(BLOB))


def in_background(fn, *args):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args)))
    thread.start()
    return thread, result


@TRANSPORTS
def test_a_growing_fill_is_streamed_and_its_end_waits_for_the_commit(blobs, transport):
    half = len(BLOB) // 2
    writer, path = start_fill(blobs, half)
    received = Received()
    thread, result = in_background(lambda: get(blobs, path, transport=transport, received=received))
    assert received.at_least(half) == half, "the blob server sends what the fill has, and nothing else"
    writer.write(BLOB[half:])
    writer.close()  # every byte is on disk, but the digest is not confirmed yet
    # The server sends the bytes up to the last one in the same writes as the last: had it sent
    # the last byte, the client would have it with the one before.
    assert received.at_least(len(BLOB) - 1) == len(BLOB) - 1, "the blob server sent the last byte before the commit"
    assert thread.is_alive()
    writer.commit()
    thread.join(10)
    status, _, body = result["value"]
    assert (status, body) == (200, BLOB)


def test_a_range_of_a_growing_fill(blobs):
    writer, path = start_fill(blobs, 1000)
    answered = threading.Event()
    thread, result = in_background(lambda: get(blobs, path, {"Range": "bytes=2000000-"}, answered=answered))
    assert answered.wait(20), "the server answers a range the fill does not have yet"
    writer.write(BLOB[1000:])
    writer.commit()
    thread.join(10)
    status, _, body = result["value"]
    assert (status, body) == (206, BLOB[2000000:])


@TRANSPORTS
def test_a_failed_fill_cuts_the_transfer(blobs, transport):
    writer, path = start_fill(blobs, len(BLOB) // 2)
    answered = threading.Event()
    thread, result = in_background(lambda: get(blobs, path, transport=transport, answered=answered))
    assert answered.wait(20), "the server has the fill open"
    writer.discard()  # what the proxy does when the bytes do not verify
    thread.join(10)
    status, _, body = result["value"]
    assert status == 200 and isinstance(body, http.client.IncompleteRead)
    assert len(body.partial) < len(BLOB)


def connect(blobs: Blobs, address: tuple[str, int]) -> connection.Server:
    server = connection.Server(address=address)
    server.via = ("http", ("corporate-proxy", 3128))
    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2))
    blobs.host.server_connect(server_hooks.ServerConnectionHookData(server=server, client=client))
    return server


def test_clients_are_routed_to_it_directly(blobs):
    server = connect(blobs, (BLOB_HOST, 443))
    assert server.address == blobs.host.address and server.via is None, "never through an upstream proxy"
    other = connect(blobs, ("registry-1.docker.io", 443))
    assert other.address == ("registry-1.docker.io", 443) and other.via is not None


@pytest.mark.parametrize(
    "listen_host, blob_urls, loopback",
    [
        ("127.0.0.1", "auto", True),
        ("0.0.0.0", "auto", False),
        ("", "auto", False),
        ("0.0.0.0", "loopback", True),
        ("127.0.0.1", "https", False),
    ],
)
def test_loopback_urls_only_where_every_client_is_local(blobs, listen_host, blob_urls, loopback):
    ctx.options.update(listen_host=listen_host, blob_urls=blob_urls)
    url = blobs.host.url(DIGEST)
    if loopback:
        assert url.startswith(f"http://127.0.0.1:{blobs.host.loopback_port}/blobs/{DIGEST}?")
    else:
        assert url.startswith(f"https://{BLOB_HOST}/blobs/{DIGEST}?")


def test_the_server_stops_with_the_proxy(blobs):
    proc = blobs.host._proc
    blobs.host.done()
    assert proc.poll() is not None


@pytest.mark.parametrize("target", ["registry-1.docker.io:443", "127.0.0.1:22"])
def test_the_connect_listener_tunnels_to_the_blob_host_only(blobs, target):
    sock, answer = tunnel(blobs, target)
    with sock:
        assert answer.startswith(b"HTTP/1.1 403 "), answer



def tls_client(blobs: Blobs) -> socket.socket:
    context = ssl.create_default_context(cafile=str(blobs.ca))
    return context.wrap_socket(socket.create_connection(blobs.host.address, timeout=10), server_hostname=BLOB_HOST)


def test_slow_clients_leave_a_normal_client_its_blob(blobs):
    """300 slow clients on the HTTPS listener, a byte every 2 s (half of them trickle a TLS
    ClientHello, half a request head after their handshake), do not keep a normal client waiting:
    it gets its blob while every one of them still holds its connection."""
    ctx.options.update(blob_head_timeout=120)  # none is cut meanwhile: the test is that none needs to be
    put(blobs.store)
    head = f"GET {path_of(blobs)} HTTP/1.1\r\nHost: {BLOB_HOST}\r\n\r\n".encode()
    hello = SlowClients(lambda: socket.create_connection(blobs.host.address, timeout=10), client_hello(), 44, 2.0, 60.0)
    heads = SlowClients(lambda: tls_client(blobs), head, 256, 2.0, 60.0)
    with heads:
        assert heads.ready.wait(60)
        with hello:
            assert hello.ready.wait(60)
            status, _, body = get(blobs, path_of(blobs))
            cut = [slow.cut_after_next_round(10) for slow in (heads, hello)]
    assert (status, body) == (200, BLOB)
    assert cut == [0, 0], "the normal client was served only once slow clients went away"


def slow_opening(blobs: Blobs, transport: str):
    """How a slow client of `transport` connects, and the bytes it then trickles."""
    head = f"GET {path_of(blobs)} HTTP/1.1\r\nHost: {BLOB_HOST}\r\nUser-Agent: {'slow ' * 50}\r\n\r\n".encode()
    match transport:
        case "tls-hello":
            return lambda: socket.create_connection(blobs.host.address, timeout=10), client_hello()
        case "tls-head":
            return lambda: tls_client(blobs), head
        case "plain-head":
            return lambda: socket.create_connection(("127.0.0.1", blobs.host.loopback_port), timeout=10), head
        case _:
            connect = f"CONNECT {BLOB_HOST}:443 HTTP/1.1\r\nHost: {BLOB_HOST}:443\r\nX-Slow: {'slow ' * 50}\r\n\r\n".encode()
            return lambda: socket.create_connection(("127.0.0.1", blobs.host.tunnel_port), timeout=10), connect


@pytest.mark.parametrize("transport", ["tls-hello", "tls-head", "plain-head", "tunnel-head"])
def test_a_head_sent_slowly_is_cut_however_steady(blobs, transport):
    """Clients that keep sending a byte every half second (never idle) are cut once their head
    is not in after blob_head_timeout; a normal client is served meanwhile and after."""
    ctx.options.update(blob_head_timeout=4)
    put(blobs.store)
    connect, opening = slow_opening(blobs, transport)
    with SlowClients(connect, opening, 5, 0.5, 60.0) as slow:
        assert slow.ready.wait(30)
        assert get(blobs, path_of(blobs), transport=transport.split("-")[0])[::2] == (200, BLOB)
        assert slow.all_cut.wait(30), "every slow client is cut"
    assert get(blobs, path_of(blobs), transport=transport.split("-")[0])[::2] == (200, BLOB)


BIG = os.urandom(16 * 1024 * 1024)


@pytest.mark.parametrize("transport", ["tls", "plain"])
def test_a_reader_slower_than_the_minimum_rate_is_cut(blobs, transport):
    """A client that stops reading its blob is cut (and its slot freed) once a part of the blob
    takes longer than blob_min_rate allows; a client reading at full speed gets it whole."""
    ctx.options.update(blob_min_rate=1024 * 1024)
    put(blobs.store, BIG, digest_of(BIG))
    ended = threading.Event()
    sent = []
    blobs.host.on_sent.append(lambda tag, count: (sent.append(count), ended.set()))
    path = path_of(blobs, digest_of(BIG), tag="stalled")
    if transport == "plain":
        sock = socket.create_connection(("127.0.0.1", blobs.host.loopback_port), timeout=20)
    else:
        sock = tls_client(blobs)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {BLOB_HOST}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert ended.wait(30), "the transfer is cut"
        received = 0
        try:
            while data := sock.recv(1 << 20):
                received += len(data)
        except OSError:
            pass
    assert sent[0] < len(BIG) and received < len(BIG)
    assert get(blobs, path_of(blobs, digest_of(BIG)), transport=transport)[::2] == (200, BIG)


def test_a_tls_reader_that_stops_is_cut_within_the_idle_timeout(blobs):
    """TLS bodies go out on a blocking socket, in writes whose deadline comes within
    client_idle_timeout: a client that stops reading is cut as the socket's idle timeout cut it,
    not once a whole 1 MiB write overran blob_min_rate (69 s at the defaults)."""
    ctx.options.update(client_idle_timeout=7)
    put(blobs.store, BIG, digest_of(BIG))
    ended = threading.Event()
    blobs.host.on_sent.append(lambda tag, count: ended.set())
    with tls_client(blobs) as sock:
        sock.sendall(f"GET {path_of(blobs, digest_of(BIG), tag='stalled')} HTTP/1.1\r\nHost: {BLOB_HOST}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert ended.wait(30), "the transfer to a client that stopped reading is cut"
    assert get(blobs, path_of(blobs, digest_of(BIG)))[::2] == (200, BIG)


def test_a_client_resumes_its_tls_session(blobs):
    """The many short requests of a pull: a client that keeps its session (curl, Python) skips the
    full handshake on its next connection."""
    put(blobs.store)
    context = ssl.create_default_context(cafile=str(blobs.ca))
    session = None
    for attempt in range(2):
        raw = socket.create_connection(blobs.host.address, timeout=20)
        with context.wrap_socket(raw, server_hostname=BLOB_HOST, session=session) as tls:
            conn = http.client.HTTPSConnection(BLOB_HOST, context=context, timeout=20)
            conn.sock = tls
            conn.request("HEAD", path_of(blobs))
            assert conn.getresponse().status == 200
            if attempt:
                assert tls.session_reused, "a full handshake again: the server handed out no session ticket"
            session = tls.session


def test_the_log_says_how_tls_is_sent(blobs, caplog):
    """kTLS where this kernel offers it, else TLS in the process: either way the blob arrives whole."""
    offered = "tls" in Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split()
    with caplog.at_level(logging.INFO, logger="hubcache.blobserver.host"):
        blobs.host.restart()
    started = [r.getMessage() for r in caplog.records if "blob server on" in r.getMessage()]
    assert len(started) == 1
    assert ("kTLS offered" in started[0]) == offered
    assert ("this kernel offers no kTLS" in started[0]) == (not offered)
    put(blobs.store)
    try:
        status, _, body = get(blobs, path_of(blobs))
    except ssl.SSLError as e:
        raise AssertionError(f"the body did not arrive as TLS (sendfile without kTLS sends plaintext): {e}") from None
    assert status == 200 and body == BLOB


def test_a_listener_on_an_address_of_this_machine_serves_signed_urls_only(blobs):
    """`blob_listen`: clients on other machines reach it directly, by the address its
    certificate names; the signature still decides what it serves."""
    ctx.options.update(blob_urls="https", blob_listen="127.0.0.2")
    assert blobs.host.direct and blobs.host.direct[0] == "127.0.0.2"
    put(blobs.store)
    url = urlsplit(blobs.host.url(DIGEST))
    assert (url.scheme, url.hostname, url.port) == ("https", "127.0.0.2", blobs.host.direct[1])
    context = ssl.create_default_context(cafile=str(blobs.ca))  # checks the address against the certificate

    def fetch(target: str, headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.2", url.port, context=context, timeout=20)
        try:
            conn.request("GET", target, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    assert fetch(f"{url.path}?{url.query}") == (200, BLOB)
    assert fetch(f"{url.path}?{url.query}", {"Range": "bytes=10-19"}) == (206, BLOB[10:20])
    assert fetch(url.path)[0] == 403
    assert fetch(f"{url.path}?{url.query}".replace("signature=", "signature=0"))[0] == 403
    other = blobserver.signed_path(os.urandom(32), DIGEST)  # signed, but not by this proxy
    assert fetch(other)[0] == 403
