"""The listeners' thread bound and idle timeout (addon/listeners.py), on a real server socket in
this process."""

from __future__ import annotations

import errno
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from hubcache.blobserver import listeners
from hubcache.blobserver.listeners import BoundedThreads
from support.slowclients import ask_from


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


class _Who(_Echo):
    """Answers with the identity of the thread that serves the connection."""

    def do_GET(self):
        body = str(threading.get_ident()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def _ask(address) -> bytes:
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(1024):
            answer += chunk
    return answer.partition(b"\r\n\r\n")[2]


def test_connections_one_after_another_are_served_by_one_reused_thread():
    # A pull opens a connection per blob: each must not cost a new thread and what it keeps.
    # A worker may still be ending its connection when the next arrives: then a second serves it.
    server = _Bounded(("127.0.0.1", 0), _Who)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        served_by = {_ask(server.server_address) for _ in range(20)}
        assert len(served_by) <= 3, f"20 connections in turn took {len(served_by)} threads"
    finally:
        server.shutdown()
        server.server_close()


def test_many_connections_at_once_are_all_served_within_the_bound():
    server = _Bounded(("127.0.0.1", 0), _Who)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answers: list[bytes] = []
    try:
        clients = [threading.Thread(target=lambda: answers.append(_ask(server.server_address))) for _ in range(40)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(60)
        assert len(answers) == 40 and all(answers)
        assert len(set(answers)) <= _Bounded.max_connections
    finally:
        server.shutdown()
        server.server_close()


def test_a_worker_without_connections_ends(monkeypatch):
    monkeypatch.setattr(listeners, "WORKER_IDLE", 0.05)
    server = _Bounded(("127.0.0.1", 0), _Who)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        worker = int(_ask(server.server_address))
        thread = next(t for t in threading.enumerate() if t.ident == worker)
        thread.join(10)
        assert not thread.is_alive(), "the idle worker still waits"
        assert _ask(server.server_address), "a new worker serves the next connection"
    finally:
        server.shutdown()
        server.server_close()


class _Shared(BoundedThreads, HTTPServer):
    max_connections = 4
    max_per_address = 2
    idle_timeout = 120.0  # nothing here is closed for being idle


def _ask_from(source: str, address) -> bytes:
    return ask_from(source, address, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


def test_one_address_holds_its_share_of_the_connections_and_no_more():
    server = _Shared(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = server.server_address
    try:
        # A client that opens connections and says nothing: its share, then refused at once.
        held = [socket.create_connection(address, timeout=30, source_address=("127.0.0.3", 0)) for _ in range(2)]
        assert _ask_from("127.0.0.3", address) == b"", "a connection beyond the address's share was served"
        assert _ask_from("127.0.0.1", address).startswith(b"HTTP/1.1 200"), "another address was kept waiting"
        held[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(1024).startswith(b"HTTP/1.1 200"), "a connection within the share is served"
        for sock in held:
            sock.close()
        # Its connections closed, the address has its share again (once the server saw them end).
        deadline = time.monotonic() + 30
        while not (answer := _ask_from("127.0.0.3", address)):
            assert time.monotonic() < deadline, "the address's closed connections still count"
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        server.shutdown()
        server.server_close()


def test_out_of_file_descriptors_a_listener_pauses_and_says_so_once(monkeypatch, caplog):
    """accept(2) failing with EMFILE leaves the connection pending, so the listening socket stays
    readable: a listener that tried again at once would spin a core and starve every client."""
    server = _Bounded(("127.0.0.1", 0), _Echo)
    pauses: list[float] = []
    monkeypatch.setattr(listeners.time, "sleep", pauses.append)
    accepted = socketserver.TCPServer.get_request
    failing = [True]

    def accept(self):
        if failing[0]:
            raise OSError(errno.EMFILE, "Too many open files")
        return accepted(self)

    monkeypatch.setattr(socketserver.TCPServer, "get_request", accept)
    try:
        for _ in range(3):
            with pytest.raises(OSError):
                server.get_request()  # socketserver's loop drops the error and selects again
        assert pauses == [listeners.FILES_PAUSE] * 3
        assert caplog.text.count("out of file descriptors") == 1, "one line while it lasts"
        failing[0] = False
        with socket.create_connection(server.server_address, timeout=10):
            request, _ = server.get_request()
            request.close()
        failing[0] = True
        with pytest.raises(OSError):
            server.get_request()
        assert caplog.text.count("out of file descriptors") == 2, "said again once it happens again"
    finally:
        server.server_close()


def test_a_share_counts_an_ipv6_clients_slash_64_as_one_client(caplog):
    """One IPv6 host is given a /64 to pick addresses from: a share per address would give it as
    many shares as it likes."""
    share = listeners.AddressShare(1, 4, "connections from")
    assert share.take("2001:db8:1:2::1", wait=False)
    assert not share.take("2001:db8:1:2:ffff::9", wait=False), "another address of the /64 was a new client"
    assert share.take("2001:db8:1:3::1", wait=False), "another /64 was refused"
    assert share.take("203.0.113.9", wait=False)
    assert not share.take("::ffff:203.0.113.9", wait=False), "an IPv4 address written as IPv6 is that client"
    assert "connections from 2001:db8:1:2::/64 refused" in caplog.text
    share.give_back("2001:db8:1:2::1")
    assert share.take("2001:db8:1:2:abcd::5", wait=False), "the /64's connection ended: its share is free"
