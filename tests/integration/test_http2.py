"""HTTP/2 clients on the proxy port.

"Rapid reset": a client that opens streams and resets each at once
costs the proxy a request's hooks per stream while costing itself a few bytes, and mitmproxy alone
reads resets as fast as they come (20 000 streams in 2 s cost the proxy 7 s of CPU). Past
`internals.RESETS` the connection gets GOAWAY (ENHANCE_YOUR_CALM) and is closed; a client that
resets now and then, and one that resets nothing, are served."""

from __future__ import annotations

import socket
import ssl

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from hubcache.mitm.internals import RESETS
from support.hostile import Hostile
from support.hubcache import upstream_options
from support.registry import REGISTRY_NAME

HTTP1_NAME = "http1.hubcache.test"


def _h2(proxy, host: str = REGISTRY_NAME) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    assert raw.recv(4096).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(raw, server_hostname=host)
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    return tls, conn


def _headers(path: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "https"), (":authority", REGISTRY_NAME), (":path", path)]


def _events_until_closed(tls: ssl.SSLSocket, conn: h2.connection.H2Connection) -> list[h2.events.Event]:
    seen: list[h2.events.Event] = []
    try:
        while data := tls.recv(65536):
            seen += conn.receive_data(data)
            tls.sendall(conn.data_to_send())
    except TimeoutError:
        raise AssertionError("the proxy left the connection open") from None
    except OSError:
        pass
    return seen


def _get(tls: ssl.SSLSocket, conn: h2.connection.H2Connection, path: str) -> int:
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, _headers(path), end_stream=True)
    tls.sendall(conn.data_to_send())
    return _answer_of(tls, conn, stream)


def _answer_of(tls: ssl.SSLSocket, conn: h2.connection.H2Connection, stream: int) -> int:
    """The status of the answer on `stream`."""
    while True:
        data = tls.recv(65536)
        assert data, "closed before the answer"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                return int(dict(event.headers)[":status"])
        tls.sendall(conn.data_to_send())


@pytest.mark.parametrize("ended", [False, True], ids=["open", "ended"])
def test_a_client_resetting_streams_as_fast_as_it_opens_them_is_cut(hubcache, registry, ended):
    """`ended`: each HEADERS frame ends its stream, and the reset comes in the same read (mitmproxy
    then sees a whole request, answered to nobody)."""
    proxy = hubcache()
    burst, _ = RESETS
    tls, conn = _h2(proxy)
    sent = 0
    try:
        for _ in range(20):  # 20 rounds of 100: at most 2000 streams, far past the burst
            for _ in range(100):
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, _headers("/v2/"), end_stream=ended)
                conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
            tls.sendall(conn.data_to_send())
            sent += 100
    except OSError:
        pass  # closed while the client still sent
    events = _events_until_closed(tls, conn)
    tls.close()
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert not goaway or goaway[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, goaway
    assert "HTTP/2 streams reset faster than" in proxy.log_text(), "the operator is told"
    assert sent < 2000 or goaway, "the proxy read every reset"
    # Another client, on its own connection, is served; so is one that resets a few streams.
    tls, conn = _h2(proxy)
    with tls:
        for _ in range(burst // 2):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, _headers("/v2/"))
            conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        assert _get(tls, conn, "/v2/") == 200


SMUGGLED = b"GET /v2/smuggled/manifests/latest HTTP/1.1\r\nHost: " + HTTP1_NAME.encode() + b"\r\n\r\n"


def test_a_body_without_length_reaches_an_http1_registry_chunked_not_as_a_second_request(hubcache, registry, dockerhub, ca):
    """A push passes through; an HTTP/2 PUT whose body states no length (Go's client sends one so)
    to a registry that speaks HTTP/1.1 only: mitmproxy wrote the body as it came, and the registry
    read it as a request of its own, one hubcache never parsed."""
    cert, key = ca.issue("http1", [HTTP1_NAME])
    upstream = Hostile("yes", cert, key)
    try:
        usual = upstream_options(registry, dockerhub)
        proxy = hubcache(
            registries=[*usual["registries"], HTTP1_NAME],
            upstream_map=[*usual["upstream_map"], f"{HTTP1_NAME}=127.0.0.1:{upstream.port}"],
        )
        tls, conn = _h2(proxy, HTTP1_NAME)
        with tls:
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, [(":method", "PUT"), (":scheme", "https"), (":authority", HTTP1_NAME), (":path", "/v2/x/blobs/uploads/1")])
            conn.send_data(stream, SMUGGLED, end_stream=True)
            tls.sendall(conn.data_to_send())
            _answer_of(tls, conn, stream)
        proxy.stop()  # closes its connection upstream: everything it carried has been read there
        upstream.wait_closed()
        seen = upstream.requests()
    finally:
        upstream.stop()
    assert [s.path for s in seen if "smuggled" in s.path] == [], "the body was read as a request"
    put = [s for s in seen if s.method == "PUT"]
    assert put and put[0].headers.get("transfer-encoding") == "chunked", seen
