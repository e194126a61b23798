"""Request heads on the proxy port: mitmproxy alone buffers a head without end (one client's 64 MB
head took the proxy from 84 to 391 MB), so hubcache refuses one still unfinished after
`internals.MAX_HEAD` bytes, a CONNECT's or a registry request's inside its tunnel, with 431 and
the connection closed; a large head within it is read as before."""

from __future__ import annotations

import json
import socket
import ssl

import pytest

from hubcache.mitm.internals import MAX_HEAD
from support import proxied
from support.mirror import mirror_get, start_mirror
from support.procs import free_port
from support.registry import REGISTRY_NAME

CHUNK = 16 * 1024
# Far beyond what loopback's socket buffers take in both directions (a few MiB each) before a
# closed connection's reset reaches the sender: a proxy that reads on takes all of it.
ENDLESS = 32 * 1024 * 1024


def _answer_to_endless_head(sock: socket.socket | ssl.SSLSocket, start: bytes) -> tuple[bytes, int]:
    """Send `start`, then header lines that never end the head, until the proxy closes the
    connection (or ENDLESS went); return what it answered and how much was sent. A proxy that
    stops reading but leaves the connection open fails here, at the socket's timeout."""
    sent = 0
    try:
        sock.sendall(start)
        while sent < ENDLESS:
            sock.sendall(b"X-Filler: " + b"f" * (CHUNK - 12) + b"\r\n")
            sent += CHUNK
    except TimeoutError:
        raise AssertionError(f"the proxy stopped reading after {sent} bytes and left the connection open") from None
    except OSError:
        pass  # it closed the connection: what it answered first is still to read
    return _until_closed(sock), sent


def _until_closed(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """What the proxy sends until it closes the connection; leaving it open fails the test."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except TimeoutError:
        raise AssertionError("the proxy left the connection open") from None
    except OSError:
        pass
    return answer


def test_an_endless_connect_head_is_refused(hubcache):
    proxy = hubcache()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        answer, sent = _answer_to_endless_head(sock, f"CONNECT {REGISTRY_NAME}:443 HTTP/1.1\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 431 ") or answer == b"", answer[:200]
    assert sent < ENDLESS, "the proxy read the whole endless head"
    assert f"request head over {MAX_HEAD} bytes: refused" in proxy.log_text()


def test_an_endless_registry_request_head_is_refused_and_a_large_one_is_read(hubcache, registry):
    proxy = hubcache()
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.sendall(f"CONNECT {REGISTRY_NAME}:443 HTTP/1.1\r\nHost: {REGISTRY_NAME}:443\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname=REGISTRY_NAME) as tls:
            answer, sent = _answer_to_endless_head(tls, f"GET /v2/ HTTP/1.1\r\nHost: {REGISTRY_NAME}\r\n".encode())
    assert sent < ENDLESS, "the proxy read the whole endless head"
    if answer:  # the answer may be lost to the reset of a connection closed while the client sent
        assert answer.startswith(b"HTTP/1.1 431 ") and b'"errors"' in answer, answer[:300]
    # A head within the limit (a large header, as a long token makes) is read as before.
    large = proxied.request(proxy.port, REGISTRY_NAME, "/v2/", ca=proxy.ca_cert, headers={"X-Large": "l" * (MAX_HEAD // 2)})
    assert large.status == 200, large.status


def _answer(sock: socket.socket | ssl.SSLSocket, request: bytes) -> tuple[int, bytes]:
    """Send `request`; the status and body of the answer, read until the connection closes."""
    sock.sendall(request)
    head, _, body = _until_closed(sock).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _registry_error(body: bytes) -> str:
    """The code of the registry error `body` is; fails the test if it is none."""
    try:
        return json.loads(body)["errors"][0]["code"]
    except (ValueError, LookupError, TypeError):
        raise AssertionError(f"not a registry error: {body[:200]!r}") from None


MALFORMED = {
    "both transfer-encoding and content-length": b"GET /v2/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    "a content-length that is no number": b"GET /v2/ HTTP/1.1\r\nHost: h\r\nContent-Length: five\r\n\r\n",
    "no request line": b"GARBAGE\r\n\r\n",
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_a_head_mitmproxy_cannot_read_is_answered_with_a_registry_error(hubcache, registry, what):
    """mitmproxy answers these itself, before any hook, with its HTML page; registry clients get
    the registry's JSON, through the proxy's tunnel and on the mirror."""
    proxy = start_mirror(hubcache)
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.sendall(f"CONNECT {REGISTRY_NAME}:443 HTTP/1.1\r\nHost: {REGISTRY_NAME}:443\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname=REGISTRY_NAME) as tls:
            status, body = _answer(tls, MALFORMED[what])
    assert (status, _registry_error(body)) == (400, "UNSUPPORTED"), body
    host, _, port = proxy.mirror.rpartition(":")
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host) as tls:
        status, body = _answer(tls, MALFORMED[what])
    assert (status, _registry_error(body)) == (400, "UNSUPPORTED"), body
    assert mirror_get(proxy, "/v2/")[0] in (200, 401), "a request it can read is answered as before"


def test_a_request_passed_to_an_upstream_that_cannot_be_reached_gets_a_registry_error(hubcache):
    """A push passes through to upstream; with upstream unreachable, mitmproxy's own 502 (its
    HTML page) reaches the client as the registry's JSON."""
    proxy = hubcache(upstream_map=[f"{REGISTRY_NAME}=127.0.0.1:{free_port()}"])
    answer = proxied.request(proxy.port, REGISTRY_NAME, "/v2/test/push/blobs/uploads/", ca=proxy.ca_cert, method="POST")
    assert answer.status == 502 and answer.headers["Content-Type"] == "application/json", answer.body[:300]
    assert _registry_error(answer.body) == "UNAVAILABLE"
