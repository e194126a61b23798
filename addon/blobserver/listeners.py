"""Threaded HTTP servers for hubcache's own listeners (the blob server, the status page): a bounded
number of connections, an idle timeout, and with `head_timeout` deadlines (`Deadlines`) that no slow
trickle of bytes resets."""

from __future__ import annotations

import collections
import errno
import http.client
import ipaddress
import logging
import queue
import resource
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from http.server import BaseHTTPRequestHandler
from typing import Any

logger = logging.getLogger(__name__)

HEAD = "finish its request head"  # what a client is given `head_timeout` for
# Bytes of a request line and its headers. http.server alone reads 100 lines of 64 KiB (6.5 MB,
# times every connection); hubcache's URLs and its clients' heads take a few hundred.
MAX_HEAD = 16 * 1024
WORKER_IDLE = 30.0  # seconds a worker thread waits for its next connection
# Seconds a listener stops accepting when the process is out of file descriptors: the connection
# it could not take stays pending, and accepting again at once would spin on it.
FILES_PAUSE = 0.1
LINGER = 2.0  # seconds a refused client has to stop sending, once it has its answer
LINGER_BYTES = 1024 * 1024  # and what of it is read meanwhile


def linger(connection: socket.socket) -> None:
    """End a connection whose client may still be sending (a refused head or body): the answer
    is sent, then the FIN, then what arrives meanwhile is read and dropped (bounded). Closed with
    bytes unread, the socket would be reset instead, and the reset destroys an answer the client
    has not read yet. (A TLS connection ends without close_notify: its reader has the answer.)"""
    try:
        connection.shutdown(socket.SHUT_WR)  # an SSLSocket's too: raw bytes from here on
        deadline, left = time.monotonic() + LINGER, LINGER_BYTES
        while left > 0 and (remaining := deadline - time.monotonic()) > 0:
            connection.settimeout(remaining)
            if not (chunk := connection.recv(min(left, 65536))):
                break
            left -= len(chunk)
    except OSError:
        pass  # reset, or timed out: the client had its time


class HeadTooLarge(http.client.HTTPException):
    """A request head beyond MAX_HEAD (http.server answers it 431)."""


class _HeadReader:
    """The connection's reader while headers are read: it refuses to give more than `budget` bytes."""

    def __init__(self, reader: Any, budget: int) -> None:
        self._reader = reader
        self._budget = budget

    def readline(self, limit: int = -1) -> bytes:
        if self._budget <= 0:
            raise HeadTooLarge(f"the request head is larger than {MAX_HEAD} bytes")
        line: bytes = self._reader.readline(self._budget if limit < 0 else min(limit, self._budget))
        self._budget -= len(line)
        return line


class BoundedHead(BaseHTTPRequestHandler):
    """A handler that reads at most MAX_HEAD bytes of a request head: a larger one gets 431 (by
    `send_error`) and its connection closes."""

    raw_requestline: bytes  # read by the handler before it parses the rest

    def parse_request(self) -> bool:
        reader = self.rfile
        self.rfile = _HeadReader(reader, MAX_HEAD - len(self.raw_requestline))  # type: ignore[assignment]
        try:
            return super().parse_request()
        finally:
            self.rfile = reader


class Watched:
    """One connection under `Deadlines`."""

    def __init__(self, deadlines: Deadlines, sock: socket.socket, peer: str):
        self._deadlines = deadlines
        self.sock = sock  # a duplicate of the connection's socket: valid until unwatched
        self.peer = peer
        self.deadline: float | None = None  # monotonic
        self.task = ""
        self.cut = False

    def expect(self, seconds: float | None, task: str) -> None:
        """The client must finish `task` (send a head, read some bytes) within `seconds`; None:
        the server itself is busy, nothing is asked of the client."""
        deadlines = self._deadlines
        with deadlines.changed:
            self.deadline = None if seconds is None else time.monotonic() + seconds
            self.task = task
            if self.deadline is not None and (deadlines.wake_at is None or self.deadline < deadlines.wake_at):
                deadlines.changed.notify()  # due before the watcher would look again


class Deadlines:
    """Cuts connections whose client missed its deadline: a shutdown(2) wakes the connection's
    thread from any read, write, sendfile or TLS handshake, which then fails and ends."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.wake_at: float | None = None  # when the watcher looks next (monotonic; None: when told)
        self._watched: set[Watched] = set()
        self._current = threading.local()
        threading.Thread(target=self._run, daemon=True, name="deadlines").start()

    @contextmanager
    def watch(self, sock: socket.socket, seconds: float, task: str) -> Iterator[Watched]:
        """Watch the connection on `sock` while the block runs in its thread (see `current`)."""
        watched = Watched(self, sock.dup(), _peer(sock))
        with self.changed:
            self._watched.add(watched)
        watched.expect(seconds, task)
        self._current.watched = watched
        try:
            yield watched
        finally:
            self._current.watched = None
            with self.changed:
                self._watched.discard(watched)
                watched.sock.close()  # under the lock: never shut down after its number is reused

    def current(self) -> Watched | None:
        """The connection this thread serves."""
        return getattr(self._current, "watched", None)

    def _run(self) -> None:
        with self.changed:
            while True:
                now = time.monotonic()
                for watched in [w for w in self._watched if w.deadline is not None and w.deadline <= now]:
                    _cut(watched)
                pending = [w.deadline for w in self._watched if w.deadline is not None]
                self.wake_at = min(pending) if pending else None
                self.changed.wait(self.wake_at - now if self.wake_at is not None else None)


def _cut(watched: Watched) -> None:
    logger.info(f"connection from {watched.peer} cut: it did not {watched.task} in time")
    watched.deadline, watched.cut = None, True
    try:
        watched.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the client


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "a client"


def allow_files(wanted: int) -> None:
    """Raise the process's soft limit of open files towards `wanted` (many systems start services
    with 1024), within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def client_of(address: str) -> str:
    """Who a client address is for a share: an IPv4 address (one written as IPv6 too), or an
    IPv6 address's /64, which one host is given to pick addresses from."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP address: itself
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AddressShare:
    """What each client (`client_of` its address) holds of something bounded (connections,
    transfers): at most `share` at once (None: no share). A client that reaches its share is
    logged once, until it holds none again."""

    def __init__(self, share: int | None, total: int | None, label: str) -> None:
        self.share = share
        self._total, self._label = total, label  # for the log line
        self._held: collections.Counter[str] = collections.Counter()
        self._logged: set[str] = set()
        self._changed = threading.Condition()

    def take(self, address: str, wait: bool) -> bool:
        """One more for `address`. At its share: False, or with `wait`, once it holds less."""
        share, address = self.share, client_of(address)
        with self._changed:
            if share is not None and self._held[address] >= share:
                if address not in self._logged:
                    self._logged.add(address)
                    outcome = "wait" if wait else "refused"
                    of = f", its share of {self._total}" if self._total else ""
                    logger.warning(f"{self._label} {address} {outcome}: it holds {share} at once{of}")
                if not wait:
                    return False
                self._changed.wait_for(lambda: self._held[address] < share)
            self._held[address] += 1
            return True

    def give_back(self, address: str) -> None:
        address = client_of(address)
        with self._changed:
            self._held[address] -= 1
            if not self._held[address]:
                del self._held[address]
                self._logged.discard(address)
            self._changed.notify_all()


class BoundedThreads:
    """Mix in before a `socketserver` server class; set `max_connections` and `idle_timeout`, and
    `head_timeout` for deadlines.

    Each connection is served in a worker thread of a pool, at most `max_connections` at once,
    with `max_per_address`, at most that many from one client address (more are closed at once).
    A worker waits WORKER_IDLE seconds for its next connection before it ends, so a pull, which
    opens a connection per blob, reuses threads and what they keep (the store's SQLite
    connection, the blob server's write buffer) instead of making them anew every time."""

    max_connections = 64
    # Of those, what one client address may hold (None: all): a client that opens connections and
    # says nothing (each kept until its head deadline) cannot take every slot from the others.
    max_per_address: int | None = None
    idle_timeout: float | None = 60.0
    head_timeout: float | None = None

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._per_address = AddressShare(self.max_per_address, self.max_connections, "connections from")
        self._waiting: queue.SimpleQueue[tuple[socket.socket, Any]] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # one per worker waiting for a connection
        self.deadlines = Deadlines() if self.head_timeout is not None else None
        self._out_of_files = False  # said so in the log, until a connection is accepted again
        super().server_activate()  # type: ignore[misc]

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            request = super().get_request()  # type: ignore[misc]
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                if not self._out_of_files:
                    self._out_of_files = True
                    logger.warning(f"out of file descriptors ({e.strerror}): new connections wait; raise the open files limit (LimitNOFILE)")
                time.sleep(FILES_PAUSE)
            raise
        self._out_of_files = False
        return request

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        assert isinstance(request, socket.socket)  # a TCP server's requests are sockets (the base class types UDP's too)
        if not self._per_address.take(client_address[0], wait=False):
            # Refused at once, unanswered: answering would take a thread, which the share bounds.
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        self._slots.acquire()  # the accepting thread waits here: the bound is backpressure
        if not self._idle.acquire(blocking=False):
            try:
                threading.Thread(target=self._work, name="connection", daemon=True).start()
            except BaseException:
                self._slots.release()
                self._per_address.give_back(client_address[0])
                raise
        self._waiting.put((request, client_address))

    def _work(self) -> None:
        while True:
            try:
                request, client_address = self._waiting.get(timeout=WORKER_IDLE)
            except queue.Empty:
                # End, unless a connection was promised to this worker meanwhile (it took the
                # token back: then that connection is in the queue, or about to be).
                if self._idle.acquire(blocking=False):
                    return
                continue
            try:
                self._serve(request, client_address)
            finally:
                self._per_address.give_back(client_address[0])
                self._slots.release()
                self._idle.release()

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            request.settimeout(self.idle_timeout)
            deadlines = self.deadlines
            watched = nullcontext() if deadlines is None or self.head_timeout is None else deadlines.watch(request, self.head_timeout, HEAD)
            with watched:
                self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]
