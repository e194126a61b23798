"""A fill: one upstream fetch of a blob into the store, shared by every client that wants it meanwhile.

hubcache fetches the blob itself (not on any client's connection), so a client that disconnects
never aborts what the others wait for. The body arrives through `sink`, the stream callable of
hubcache's own upstream request. On the fetch thread (`fetcher.py`) or a shared store's pour it is
hashed and appended to the fill's temporary file right there, while the bytes just decrypted are
still in the CPU's cache, and the caller reads into the same buffer again; on mitmproxy's event
loop (a request that went through its core) a writer thread does it, so the loop never waits on
the disk. The blob server streams that file to clients as it grows.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from enum import Enum
from pathlib import Path

from mitmproxy import http

from ..mitm.flows import Source
from ..registry.protocol import Route
from ..storage.store import BlobWriter

_END = None
# Chunks from the event loop waiting for the writer thread. Nothing reads hubcache's own request,
# so upstream is read as fast as it sends: when the disk falls behind, the loop's reading waits
# here (backpressure) rather than the proxy's memory growing with the blob.
QUEUED_CHUNKS = 16


class State(Enum):
    """A fill's life. It starts DECIDING and is ANSWERED (its `answered` event set) once it leaves
    that: with a body (STREAMING, then COMMITTED or REJECTED), or without one."""

    DECIDING = "deciding"  # looking in the store and the fleet, or waiting for upstream's answer
    CACHED = "cached"  # the store had the blob after all: nothing is fetched
    UNUSABLE = "unusable"  # the cache folder cannot take the blob (`reason`): clients go upstream
    REFUSED = "refused"  # upstream answered something other than the blob (`answer`: 401, 404...)
    FAILED = "failed"  # no answer from upstream (`reason`)
    STREAMING = "streaming"  # the body is being written to the fill's file; `size` if announced
    COMMITTED = "committed"  # the body verified and is in the store
    REJECTED = "rejected"  # the body did not verify, or could not be written: discarded

    @property
    def has_body(self) -> bool:
        return self in (State.STREAMING, State.COMMITTED, State.REJECTED)


class Fill:
    def __init__(self, route: Route):
        self.route = route
        self.state = State.DECIDING
        self.writer: BlobWriter | None = None  # the temporary file, once there is a body to keep
        self.size: int | None = None  # from upstream's Content-Length, once its answer came
        self.answer: http.Response | None = None  # REFUSED: upstream's answer
        self.reason = ""  # UNUSABLE or FAILED: why, in an operator's words
        self.source = Source.UPSTREAM  # or the fleet's shared store
        self.answered = asyncio.Event()  # set once the state is no longer DECIDING
        self.done = asyncio.Event()
        self.progress = time.monotonic()  # when the last bytes arrived
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUED_CHUNKS)
        self._thread = threading.Thread(target=self._drain, name="hubcache fill", daemon=True)
        self._lock = threading.Lock()  # a write on the caller's thread against discard
        self._discarded = False

    @property
    def name(self) -> str:
        """The temporary file, relative to the store's tmp folder (what the blob server opens)."""
        assert self.writer
        return str(Path(self.writer.path).resolve().relative_to((self.writer.store.directory / "tmp").resolve()))

    def _leave(self, state: State) -> None:
        assert self.state is State.DECIDING, f"a fill that is {self.state.value} cannot become {state.value}"
        self.state = state
        self.answered.set()

    def start_streaming(self, size: int | None) -> None:
        self.size = size
        self._leave(State.STREAMING)

    def sink(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The stream callable. Off the event loop it hashes and writes `data` before it returns
        (the caller may then read into the same buffer again; a disk that falls behind holds the
        reading back). On the event loop it only queues for the writer thread, and waits only
        when the writer is QUEUED_CHUNKS behind."""
        self.progress = time.monotonic()
        if self._thread.is_alive() or _on_event_loop():
            if not self._thread.is_alive():
                self._thread.start()
            self._queue.put(bytes(data) if data else _END)  # mitmproxy's core hands over bytes: no copy
        elif data:
            assert self.writer
            with self._lock:
                if not self._discarded:  # cut: the fetch ends, and its last bytes have nowhere to go
                    self.writer.write(data)
        return []  # nobody reads hubcache's own request

    def _drain(self) -> None:
        assert self.writer
        while (chunk := self._queue.get()) is not _END:
            self.writer.write(chunk)

    def finish(self) -> bool:
        """After the last byte (blocking): commit if size and digest verify. Returns whether it did."""
        assert self.writer and self.state is State.STREAMING
        if self._thread.ident is not None:
            self._thread.join()
        self.writer.close()
        if not self.writer.verified(self.size) or self.writer.write_error:
            self.state = State.REJECTED
            return False
        self.writer.commit()
        self.state = State.COMMITTED
        return True

    def refused(self, answer: http.Response) -> None:
        self.answer = answer
        self._leave(State.REFUSED)

    def fail(self, reason: str) -> None:
        """No blob: upstream could not be asked, or its body did not arrive whole."""
        self.reason = reason
        if self.state is State.STREAMING:
            self.state = State.REJECTED  # the clients streaming it are cut when it is discarded
        else:
            self._leave(State.FAILED)

    def found_cached(self) -> None:
        """No fetch after all: the blob is in the store already."""
        self._leave(State.CACHED)

    def unusable(self, reason: str) -> None:
        """The cache folder cannot take the blob; its clients fetch it themselves."""
        self.reason = reason
        if self.state is State.STREAMING:
            self.state = State.REJECTED
        else:
            self._leave(State.UNUSABLE)

    def discard(self) -> None:
        """Drop the temporary file unless committed (blocking). The blob server notices and cuts
        the transfers it was streaming from it."""
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()
        with self._lock:
            self._discarded = True
            if self.writer and self.state is not State.COMMITTED:
                self.writer.discard()


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
