"""Slow clients for the exhaustion tests: many connections that each send their opening bytes one
at a time, a byte every `interval` seconds, the way a client would hold a server's connection
slots while costing itself almost nothing. Bounded: they stop after `lifetime` seconds (or when
stopped) and close every connection. And `ask_from`, a request from a chosen client address, for
the tests of one address's share."""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time


def ask_from(source: str, address, request: bytes) -> bytes:
    """The answer to `request` sent from the address `source`; b"" if the server closed the
    connection without one."""
    answer = b""
    with socket.create_connection(address, timeout=30, source_address=(source, 0)) as sock:
        try:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed with the request unread
    return answer


def client_hello() -> bytes:
    """The first flight of a TLS client (its ClientHello), as a slow client would trickle it."""
    context = ssl.create_default_context()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="blobs.hubcache.invalid")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class SlowClients:
    """`count` connections made by `connect()` (each returning a connected socket, TLS or not),
    each sending `opening` one byte per `interval` seconds. `cut` counts the connections the
    server closed; `all_cut` is set once the server closed every one, `stopped` once they stop."""

    def __init__(self, connect, opening: bytes, count: int, interval: float, lifetime: float):
        self.connect, self.opening = connect, opening
        self.count, self.interval, self.lifetime = count, interval, lifetime
        self.cut = 0
        self.ready = threading.Event()  # every connection is open and has sent its first byte
        self.all_cut = threading.Event()
        self.stopped = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._rounds = 0  # rounds of sends (and looks for cuts) done
        self._round_done = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowClients:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def cut_after_next_round(self, timeout: float) -> int | None:
        """The number of connections cut, once a round that starts now has looked at every one
        (None: they stopped before one did)."""
        with self._round_done:
            wanted = self._rounds + 2  # the round under way may have looked already
            self._round_done.wait_for(lambda: self._rounds >= wanted or self.stopped.is_set(), timeout)
            return self.cut if self._rounds >= wanted else None

    def _run(self) -> None:
        socks: dict[socket.socket, int] = {}  # open connection -> bytes of the opening sent
        deadline = time.monotonic() + self.lifetime
        try:
            for _ in range(self.count):
                sock = self.connect()
                sock.setblocking(False)
                socks[sock] = 0
            while socks and not self._stop.is_set() and time.monotonic() < deadline:
                for sock in list(socks):
                    if self._closed(sock) or not self._send_next(sock, socks):
                        del socks[sock]
                        sock.close()
                        with self._lock:
                            self.cut += 1
                with self._round_done:
                    self._rounds += 1
                    self._round_done.notify_all()
                self.ready.set()
                self._stop.wait(self.interval)
            if not socks:
                self.all_cut.set()
        finally:
            with self._round_done:
                self.stopped.set()  # before the connections close: a server slot may free at once
                self._round_done.notify_all()
            self.ready.set()
            for sock in socks:
                sock.close()

    @staticmethod
    def _closed(sock: socket.socket) -> bool:
        """Whether the server closed the connection (what it sent before closing is read and dropped)."""
        while select.select([sock], [], [], 0)[0]:
            try:
                if not sock.recv(65536):
                    return True
            except (ssl.SSLWantReadError, BlockingIOError):
                return False
            except OSError:
                return True
        return False

    def _send_next(self, sock: socket.socket, socks: dict[socket.socket, int]) -> bool:
        sent = socks[sock]
        if sent < len(self.opening):
            try:
                sock.send(self.opening[sent : sent + 1])
            except (ssl.SSLWantWriteError, BlockingIOError):
                return True
            except OSError:
                return False
            socks[sock] = sent + 1
        return True
