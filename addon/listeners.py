"""Threaded HTTP servers for hubcache's own listeners (the blob server, the status page).

Each connection is served in a thread of its own, up to a bound: past it, new connections wait
in the listen queue until one ends. A connection that sends nothing (or reads nothing) for
`idle_timeout` seconds is dropped, so a client cannot hold threads by opening connections and
going quiet, and a TLS handshake that never finishes holds its thread no longer either.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any


class BoundedThreads(ThreadingMixIn):
    """Mix in before a `socketserver` server class; set `max_connections` and `idle_timeout`."""

    daemon_threads = True
    max_connections = 64
    idle_timeout: float | None = 60.0

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().server_activate()  # type: ignore[misc]

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        self._slots.acquire()  # the accepting thread waits here: the bound is backpressure
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        try:
            if isinstance(request, socket.socket):
                request.settimeout(self.idle_timeout)
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
