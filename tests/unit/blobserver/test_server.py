"""The blob server (addon/blobserver/server.py): its TLS sending (kTLS detected, and a context that
asks for it only where the kernel offers it), and attacks on its listeners; on sockets in this
process."""

from __future__ import annotations

import datetime
import http.client
import io
import json
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from h11._receivebuffer import ReceiveBuffer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mitmproxy.net.http import http1

from hubcache.blobserver import listeners
from hubcache.blobserver import server as blobserver
from hubcache.registry.protocol import digest_of
from hubcache.storage.store import Store


def test_ktls_is_offered_only_by_a_kernel_listing_the_tls_ulp(tmp_path):
    ulp = tmp_path / "tcp_available_ulp"
    ulp.write_text("mptcp\n")
    assert not blobserver.ktls_offered(ulp)
    ulp.write_text("mptcp tls\n")
    assert blobserver.ktls_offered(ulp) == hasattr(ssl, "OP_ENABLE_KTLS")
    assert not blobserver.ktls_offered(tmp_path / "absent"), "no such file: an old or foreign kernel"


def _credentials_fd() -> int:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blobs.hubcache.invalid")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    fd = os.memfd_create("test-credentials")
    os.write(fd, cert.public_bytes(serialization.Encoding.PEM))
    os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return fd


def test_the_context_asks_for_ktls_only_where_offered_and_hands_out_session_tickets():
    with_ktls = blobserver.server_context(_credentials_fd(), ktls=True)
    without = blobserver.server_context(_credentials_fd(), ktls=False)
    assert with_ktls.options & ssl.OP_ENABLE_KTLS
    assert not without.options & ssl.OP_ENABLE_KTLS
    assert with_ktls.num_tickets == without.num_tickets == blobserver.TICKETS >= 1


def test_a_socket_without_ktls_is_written_by_openssl():
    left, right = socket.socketpair()
    with left, right:
        assert not blobserver.kernel_tls(left), "no kernel TLS: sendfile(2) would send plaintext"


def test_the_client_chooses_the_cipher():
    """A Go client on AES hardware lists AES-128-GCM first; OpenSSL's own order would give it AES-256."""
    server = blobserver.server_context(_credentials_fd(), ktls=False)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2  # the one version whose order Python can set
    client.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    left, right = socket.socketpair()
    chosen: list[str] = []

    def serve() -> None:
        with server.wrap_socket(left, server_side=True) as tls:
            chosen.append(tls.cipher()[0])

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(right) as tls:
        tls.do_handshake()
    thread.join(timeout=20)
    assert chosen == ["ECDHE-ECDSA-AES128-GCM-SHA256"]


# Attacks on the listeners, the way a client on another machine reaches them (docs/security.md):
# the handler in this process, on a real socket (`served`) or on bytes in memory (`answer`).

SECRET = b"s" * 32
BLOB = b"a blob of some bytes\n" * 100
DIGEST = digest_of(BLOB)


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "cache")
    writer = store.blob_writer(DIGEST)
    writer.write(BLOB)
    writer.commit()
    yield store
    store.close()


def _handler_class(store: Store) -> type[blobserver._Handler]:
    return type("Handler", (blobserver._Handler,), {"store": store, "secret": SECRET})


@pytest.fixture
def served(store):
    """The plain listener's address, serving `store`."""
    server = blobserver._PlainServer(("127.0.0.1", 0), _handler_class(store))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address
    server.shutdown()
    server.server_close()


class _Kept(io.BufferedReader):
    """One reader across pipelined answers (an HTTPResponse closes its reader once read)."""

    def close(self) -> None:
        pass


def exchange(address, data: bytes) -> list[tuple[int, dict, bytes]]:
    """Send `data` on one connection, then read every answer until the server closes it."""
    methods = re.findall(rb"^([A-Z]+) ", data, re.MULTILINE)  # of the requests in `data`, in order
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(data)
        reader = _Kept(socket.SocketIO(sock, "rb"))
        answers: list[tuple[int, dict, bytes]] = []
        for method in methods:
            response = http.client.HTTPResponse(sock, method=method.decode())
            response.fp = reader
            try:
                response.begin()
            except http.client.RemoteDisconnected:
                break
            answers.append((response.status, dict(response.headers), response.read()))
        assert reader.read() == b"", "the server closed the connection after its last answer"
        return answers


def request(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 10.0.0.5:5001\r\n{extra}\r\n".encode()


def code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def signed(**fields) -> str:
    return blobserver.signed_path(SECRET, DIGEST, **fields)


def test_a_signed_url_is_served_and_pipelined_requests_after_a_head_too(served):
    """The legitimate path: HEAD, then GET, then a ranged GET on one connection."""
    path = signed(tag="docker.io/library/alpine:3.20")
    answers = exchange(served, request(path, "HEAD") + request(path) + request(path, extra="Range: bytes=3-7\r\nConnection: close\r\n"))
    assert [(status, body) for status, _, body in answers] == [(200, b""), (200, BLOB), (206, BLOB[3:8])]
    assert answers[0][1]["Content-Length"] == str(len(BLOB))


def _respell_query(path: str) -> str:
    """The same fields, every character of their values percent-encoded (a client may re-encode)."""
    base, _, query = path.partition("?")
    fields = [field.partition("=") for field in query.split("&")]
    return base + "?" + "&".join(f"{key}={''.join(f'%{b:02X}' for b in unquote(value).encode())}" for key, _, value in fields)


def test_a_query_spelled_otherwise_but_meaning_the_same_is_served(served):
    assert exchange(served, request(_respell_query(signed(tag="docker.io/library/alpine:3.20")), extra="Connection: close\r\n"))[0][::2] == (200, BLOB)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda p: p.replace("expires=", "expires=%C2%B2"), id="expires-superscript"),
        pytest.param(lambda p: p.replace("expires=", "expires=" + "0" * 5000), id="expires-5000-digits"),
        pytest.param(lambda p: p + "&size=%D9%A1", id="size-arabic-digit"),
        pytest.param(lambda p: p + "&size=" + "9" * 5000, id="size-5000-digits"),
        pytest.param(lambda p: p.replace("?", "?tag=docker.io/evil/other:1&"), id="a-second-tag-first"),
        pytest.param(lambda p: p.replace("?", "?signature=0&"), id="a-second-signature-first"),
        pytest.param(lambda p: p + "&signature=0", id="a-second-signature-last"),
        pytest.param(lambda p: re.sub("signature=[^&]*", "signature=%C3%A9", p), id="signature-non-ascii"),
        pytest.param(lambda p: re.sub("signature=[^&]*", "signature=\xe9", p), id="signature-latin-1-raw"),
        pytest.param(lambda p: re.sub("tag=[^&]*", "tag=%E2%80%AE", p), id="tag-non-ascii"),
        pytest.param(lambda p: p + "&debug=1", id="an-unknown-field"),
        pytest.param(lambda p: p + "&&", id="empty-fields"),
        pytest.param(lambda p: p.replace("/blobs/", "/blobs/../blobs/"), id="dot-dot"),
        pytest.param(lambda p: p.replace("/blobs/sha256:", "/blobs/sha256%3A"), id="percent-encoded-digest"),
        pytest.param(lambda p: p.replace("?", "%00?"), id="nul"),
        pytest.param(lambda p: p.replace("?", "/?"), id="trailing-slash"),
        pytest.param(lambda p: p.replace("/blobs/", "/blobs//"), id="empty-segment"),
        pytest.param(lambda p: p.replace("/blobs/", "/blobs%2F"), id="encoded-slash"),
    ],
)
def test_a_mangled_url_is_refused_with_a_registry_error(served, mangle):
    """Before anything reads a field: an unsigned spelling gets 403 DENIED, never a dropped connection."""
    path = mangle(signed(tag="docker.io/library/alpine:3.20"))
    answers = exchange(served, request(path) + request(signed(), extra="Connection: close\r\n"))
    assert [status for status, _, _ in answers] == [403, 200], "the connection goes on serving signed URLs"
    assert code(answers[0][2]) == "DENIED" and answers[1][2] == BLOB


@pytest.mark.parametrize(
    "spans",
    [
        pytest.param("bytes=" + "9" * 5000 + "-", id="first-5000-digits"),
        pytest.param("bytes=-" + "9" * 5000, id="suffix-5000-digits"),
        pytest.param("bytes=\u00b2-", id="superscript"),
        pytest.param("bytes=0-1,3-4", id="two-ranges"),
        pytest.param("bytes=5-2", id="backwards"),
        pytest.param("bytes=0-0, 0-0", id="overlapping"),
    ],
)
def test_an_invalid_range_gets_a_registry_error(served, spans):
    answers = exchange(served, request(signed(), extra=f"Range: {spans}\r\n") + request(signed(), extra="Connection: close\r\n"))
    assert len(answers) == 2, "both requests answered"
    status, headers, body = answers[0]
    assert (status, code(body), headers["Content-Range"]) == (416, "RANGE_INVALID", f"bytes */{len(BLOB)}")
    assert answers[1][::2] == (200, BLOB)


@pytest.mark.parametrize(
    "smuggled",
    [
        pytest.param("Content-Length: {n}\r\n", id="content-length"),
        pytest.param("Content-Length: 0\r\nContent-Length: {n}\r\n", id="two-content-lengths"),
        pytest.param("Transfer-Encoding: chunked\r\n", id="chunked"),
        pytest.param("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", id="content-length-and-chunked"),
        pytest.param("Content-Length : {n}\r\n", id="space-before-colon"),
        pytest.param("X-Padding: a\r\n Content-Length: {n}\r\n", id="obs-fold"),
        pytest.param("Transfer-Encoding\x0b: chunked\r\n", id="vertical-tab"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_body_that_hides_a_second_request_is_refused_and_the_connection_closed(served, smuggled, method):
    """Another parser in front (a load balancer) reads a body by these headers; http.server reads
    none, so the body would be its next request: never answered."""
    hidden = request(signed(), extra="Connection: close\r\n")
    answers = exchange(served, request(signed(), method, smuggled.format(n=len(hidden))) + hidden)
    assert len(answers) == 1, "the hidden request was answered"
    status, _, body = answers[0]
    assert status in (400, 413) and body in (b"", answers[0][2])
    if method == "GET":
        assert code(body) == "UNSUPPORTED"


@pytest.mark.parametrize(
    "head, status",
    [
        (b"POST /blobs/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405),
        (b"DELETE " + signed().encode() + b" HTTP/1.1\r\n\r\n", 405),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        (b"GET /blobs/x HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET " + signed().encode() + b"\r\n\r\n", 505),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /blobs/x HTTP/1.1\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
        (b"GET /blobs/x HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 2000 + b"\r\n", 431),
    ],
    ids=["post", "delete", "http2-preface", "bad-request-line", "http-0.9-signed", "overlong-target", "huge-header", "many-headers"],
)
def test_what_http_server_refuses_itself_is_a_registry_error(served, head, status):
    with socket.create_connection(served, timeout=20) as sock:
        sock.sendall(head)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))  # then the server closes
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
    assert b"\r\nContent-Type: application/json\r\n" in answer, answer[:300]
    assert code(answer.partition(b"\r\n\r\n")[2]) == "UNSUPPORTED"
    assert exchange(served, request(signed(), extra="Connection: close\r\n"))[0][::2] == (200, BLOB)


class _Server:
    """What a handler asks of its server, without one (no deadlines, no socket)."""

    deadlines = None
    head_timeout = blobserver.HEAD_TIMEOUT
    min_rate = blobserver.MIN_RATE

    @staticmethod
    @contextmanager
    def transfer(address: str) -> Iterator[None]:
        yield


def answer(store: Store, data: bytes) -> tuple[bytes, bool, int]:
    """The first answer to `data` (written, never a blob's body), whether the connection stays
    open after it, and how many bytes of `data` the handler read."""
    handler = _handler_class(store).__new__(_handler_class(store))
    handler.rfile, handler.wfile = io.BytesIO(data), io.BytesIO()
    handler.server, handler.client_address, handler.connection = _Server(), ("192.0.2.1", 40000), None  # type: ignore[assignment]
    handler.close_connection = True
    handler.handle_one_request()
    return handler.wfile.getvalue(), not handler.close_connection, handler.rfile.tell()


def test_a_huge_head_is_refused_after_reading_a_bounded_part_of_it(store):
    """http.server alone reads 100 header lines of 64 KiB (6.5 MB, times each connection)."""
    head = b"GET /blobs/x HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"h" * 65000) for i in range(99)) + b"\r\n"
    written, keeps, read = answer(store, head)
    assert written.startswith(b"HTTP/1.1 431 ") and not keeps
    assert read <= listeners.MAX_HEAD, f"{read} bytes of the head read"


# Generated heads: wherever the blob server keeps a connection open after an answer, mitmproxy's
# HTTP/1 reader (as a server in front of it would be) ends that request at the same byte, with no
# body; otherwise the second request below could be read as the first one's body, or the reverse.

_NAMES = st.sampled_from(["Content-Length", "Content-Length", "content-length", "Transfer-Encoding", "Transfer-Encoding", "Range", "Host", "Expect", "Connection"])
_VALUES = st.sampled_from(["0", "5", "5", " 5", "5 ", "05", "+5", "5,5", "0, 0", "-1", "chunked", "chunked", "identity", "gzip, chunked", "", "١", "bytes=0-3", "100-continue", "close", "\x00"])
_SEPARATORS = st.sampled_from([": ", ": ", ": ", ":", " : ", ":\t", "\t: ", "\x0b: ", ": \r"])
_ENDS = st.sampled_from(["\r\n", "\r\n", "\r\n", "\n", "\r\r\n"])
_HEADER = st.tuples(_NAMES, _SEPARATORS, _VALUES, _ENDS, st.sampled_from(["", "", "", "", " ", "\t"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(_HEADER, min_size=1, max_size=4), end=_ENDS, method=st.sampled_from(["GET", "HEAD"]), version=st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
@example(headers=[("Content-Length", ": ", "5", "\r\n", "")], end="\r\n", method="GET", version="HTTP/1.1")
@example(headers=[("Transfer-Encoding", ": ", "chunked", "\n", "")], end="\n", method="HEAD", version="HTTP/1.1")
@example(headers=[("Content-Length", " : ", "5", "\r\n", "")], end="\r\n", method="GET", version="HTTP/1.1")
def test_a_connection_kept_open_agrees_with_mitmproxys_reader_on_where_the_request_ends(store, headers, end, method, version):
    lines = [f"{method} {blobserver.signed_path(SECRET, digest_of(b'not cached'))} {version}{end}"]  # answered 404, from memory
    lines += [f"{fold}{name}{separator}{value}{line_end}" for name, separator, value, line_end, fold in headers]
    data = ("".join(lines) + end).encode()
    following = b"GET /blobs/next HTTP/1.1\r\n\r\n"
    _, keeps, read = answer(store, data + following)
    if not keeps:
        return
    buffer = ReceiveBuffer()
    buffer += data + following
    head = buffer.maybe_extract_lines()
    try:
        assert head is not None
        parsed = http1.read_request_head([bytes(line) for line in head])
        size = http1.expected_http_body_size(parsed)
    except ValueError:
        return  # mitmproxy refuses it and closes: nothing follows on its side
    assert (read, size) == (len(data), 0), f"the blob server took {read} bytes and no body; mitmproxy {len(data) + len(following) - len(buffer)} and a body of {size}"


@pytest.fixture
def tls_served(store):
    """The HTTPS listener serving `store` (as for clients on other machines), with 4 connections
    and a head deadline of 1 s."""
    bounded = type("Bounded", (blobserver._TLSServer,), {"max_connections": 4, "head_timeout": 1.0})
    server = bounded(("127.0.0.1", 0), _handler_class(store), blobserver.server_context(_credentials_fd(), ktls=False))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address
    server.shutdown()
    server.server_close()


def _tls_get(address, path: str, sni: str | None) -> tuple[int, bytes]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # its certificate is self-signed here
    conn = http.client.HTTPConnection("blobs.hubcache.invalid", timeout=15)
    conn.sock = context.wrap_socket(socket.create_connection(address, timeout=15), server_hostname=sni)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "head, body, status",
    [
        (b"GET /blobs/x HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", b"", 431),
        (b"GET /blobs/x HTTP/1.1\r\nContent-Length: 200000\r\n\r\n", b"x" * 200000, 413),
    ],
    ids=["huge-header", "a-body"],
)
def test_a_refused_tls_client_still_sending_gets_its_answer(tls_served, head, body, status):
    """The answer goes out before the client has sent everything: closed with those bytes unread,
    the socket would be reset, and the reset destroys the answer on its way (over TLS, where the
    server reads in records, it always did)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(tls_served, timeout=15), server_hostname="blobs.hubcache.invalid") as tls:
        answer = b""
        try:
            tls.sendall(head + body)
            while chunk := tls.recv(65536):
                answer += chunk
        except OSError:
            pass  # the end without close_notify (ssl.SSLEOFError), or the reset this test is about
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
    assert code(answer.partition(b"\r\n\r\n")[2]) in ("UNSUPPORTED", "BODY_UNSUPPORTED")
    assert _tls_get(tls_served, signed(), None) == (200, BLOB), "the listener serves on"


def test_tls_abuse_leaves_the_listener_to_its_clients(tls_served):
    # The SNI decides nothing: none, another name, its own, the signature alone does.
    for sni in (None, "registry-1.docker.io", "blobs.hubcache.invalid"):
        assert _tls_get(tls_served, signed(), sni) == (200, BLOB), sni
        assert _tls_get(tls_served, f"/blobs/{DIGEST}", sni)[0] == 403, sni
    # Plain HTTP to the TLS port: no answer in plaintext, no byte of the blob.
    with socket.create_connection(tls_served, timeout=15) as sock:
        sock.sendall(request(signed()))
        data = _until_closed(sock)
    assert not data.startswith(b"HTTP/") and BLOB[:40] not in data
    # Every connection taken by a handshake begun and never finished: cut by the head deadline,
    # then a client is served.
    stuck = [socket.create_connection(tls_served, timeout=15) for _ in range(4)]
    try:
        for sock in stuck:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
        try:
            assert _tls_get(tls_served, signed(), "blobs.hubcache.invalid") == (200, BLOB)
        except TimeoutError:
            pytest.fail("no answer while unfinished handshakes held every connection")
        assert all(_until_closed(sock) == b"" for sock in stuck), "each was cut, unanswered"
    finally:
        for sock in stuck:
            sock.close()


def _until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (a reset closes it too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_fill_name_that_leaves_the_tmp_folder_is_never_opened(served, store):
    """Defence in depth: even a URL the proxy signed opens only a fill's own name in tmp/."""
    secret = store.directory / "secret"
    secret.write_bytes(b"not a fill")
    absent = digest_of(b"a blob being filled")
    escape = f"{os.getpid()}/../../secret"
    assert (store.directory / "tmp" / escape).read_bytes() == b"not a fill", "the name reaches the file"
    path = blobserver.signed_path(SECRET, absent, fill=escape, size=10)
    with socket.create_connection(served, timeout=20) as sock:
        sock.sendall(request(path, extra="Connection: close\r\n"))
        reader = sock.makefile("rb")
        status = reader.readline()  # a fill's file would be sent but its last byte, then waited on
        assert status.startswith(b"HTTP/1.1 404 "), status
        assert code(reader.read().partition(b"\r\n\r\n")[2]) == "BLOB_UNKNOWN"


@settings(max_examples=200, deadline=None)
@given(
    tag=st.text(st.characters(blacklist_categories=["Cs"]), max_size=100),
    fill=st.one_of(st.just(""), st.from_regex(r"[0-9]{1,7}/[A-Za-z0-9_]{1,12}/fill-[A-Za-z0-9_]{1,12}", fullmatch=True)),
    size=st.integers(0, 10**18 - 1),  # every size hubcache reads is a units.decimal: 18 digits at most
)
def test_every_url_the_proxy_signs_reads_back_as_it_signed_it(tag, fill, size):
    """The legitimate path of the strict reading: whatever a tag holds, the fields come back whole."""
    size = size if fill else 0
    fields = blobserver.parse_query(urlsplit(blobserver.signed_path(SECRET, DIGEST, fill, size, tag)).query)
    assert fields is not None
    assert (fields.get("fill", ""), int(fields.get("size", "0")), fields.get("tag", "")) == (fill, size, tag)
    assert fields["signature"] == blobserver.sign(SECRET, DIGEST, int(fields["expires"]), fill, size, tag)


def test_one_address_holds_its_share_of_the_transfers_and_the_others_are_served(store, caplog):
    """A client whose readers stop (each just fast enough for its deadline, say) holds its share of
    the transfer slots; its further transfers wait for its own, never for the others'."""
    big = os.urandom(1024 * 1024) * 48  # more than the sockets buffer: its sender blocks
    writer = store.blob_writer(digest_of(big))
    writer.write(big)
    writer.commit()
    shared = type("Shared", (blobserver._PlainServer,), {"max_transfers": 4, "max_transfers_per_address": 1})
    server = shared(("127.0.0.1", 0), _handler_class(store))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    address = server.server_address
    stalled = socket.create_connection(address, timeout=30, source_address=("127.0.0.3", 0))
    answers: list[bytes] = []
    try:
        stalled.sendall(request(blobserver.signed_path(SECRET, digest_of(big))))
        stalled.recv(1)  # its transfer began; it reads nothing more
        second = threading.Thread(target=lambda: answers.append(_get_from("127.0.0.3", address, signed())))
        second.start()
        deadline = time.monotonic() + 30
        while not any("transfers to 127.0.0.3 wait" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the address's second transfer did not wait for its share"
            assert second.is_alive(), f"served beyond its share: {answers}"
            time.sleep(0.01)
        assert _get_from("127.0.0.1", address, signed()).endswith(BLOB), "another address waited"
        stalled.close()  # its transfer fails: the address's turn comes
        second.join(30)
        assert answers and answers[0].endswith(BLOB)
    finally:
        stalled.close()
        server.shutdown()
        server.server_close()


def _get_from(source: str, address, path: str) -> bytes:
    with socket.create_connection(address, timeout=30, source_address=(source, 0)) as sock:
        sock.sendall(request(path, extra="Connection: close\r\n"))
        return _until_closed(sock)

