"""The listeners' thread bound and idle timeout (addon/listeners.py), on a real server socket in
this process."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from hubcache.blobserver.listeners import BoundedThreads


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
