"""Request heads on the proxy port: mitmproxy alone buffers a head without end (one client's 64 MB
head took the proxy from 84 to 391 MB), so hubcache refuses one still unfinished after
`internals.MAX_HEAD` bytes, a CONNECT's or a registry request's inside its tunnel, with 431 and
the connection closed; a large head within it is read as before."""

from __future__ import annotations

import socket
import ssl

from hubcache.mitm.internals import MAX_HEAD
from support import proxied
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
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except TimeoutError:
        raise AssertionError("the proxy left the connection open") from None
    except OSError:
        pass
    return answer, sent


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
