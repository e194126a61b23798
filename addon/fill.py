"""A fill: one upstream fetch of a blob into the store, shared by every client that wants it meanwhile.

hubcache fetches the blob itself (not on any client's connection), so a client that disconnects
never aborts what the others wait for. The body arrives through `sink`, mitmproxy's stream
callable for hubcache's own upstream request; a writer thread hashes it and appends it to the
fill's temporary file, so no disk work and no hashing happens on mitmproxy's event loop. The blob
server streams that file to clients as it grows.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

from mitmproxy import http

from .protocol import Route
from .store import BlobWriter

FILL = "hubcache_fill"  # flow metadata of hubcache's own blob request: the digest of the fill it feeds
_END = None
# Chunks waiting for the writer thread. Nothing reads hubcache's own request, so upstream is read
# as fast as it sends: when the disk falls behind, the event loop waits here (backpressure)
# rather than the proxy's memory growing with the blob.
QUEUED_CHUNKS = 64


class Fill:
    def __init__(self, route: Route):
        self.route = route
        self.writer: BlobWriter | None = None  # the temporary file, once there is a body to keep
        self.cached = False  # the store had the blob after all: nothing to fetch
        self.unusable = ""  # why the cache folder could not take the blob
        self.size: int | None = None  # from upstream's Content-Length, once its answer came
        self.streaming = False  # upstream answered 200 and the body is being written
        self.answer: http.Response | None = None  # upstream's answer when it was not a body to keep
        self.failure = ""  # why the fill ended without a blob
        self.committed = False
        self.source = "upstream"  # where the bytes come from: "upstream", or "shared" (fleet mode)
        self.answered = asyncio.Event()  # set once streaming, answer or failure is known
        self.done = asyncio.Event()
        self.progress = time.monotonic()  # when the last bytes arrived
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUED_CHUNKS)
        self._thread = threading.Thread(target=self._drain, name="hubcache fill", daemon=True)

    @property
    def name(self) -> str:
        """The temporary file, relative to the store's tmp folder (what the blob server opens)."""
        assert self.writer
        return str(Path(self.writer.path).resolve().relative_to((self.writer.store.directory / "tmp").resolve()))

    def start_streaming(self, size: int | None) -> None:
        self.size = size
        self.streaming = True
        self._thread.start()
        self.answered.set()

    def sink(self, data: bytes) -> list[bytes]:
        """mitmproxy's stream callable: runs on the event loop, so it only queues (and waits
        only when the writer is QUEUED_CHUNKS behind)."""
        self.progress = time.monotonic()
        self._queue.put(data if data else _END)
        return []  # nobody reads hubcache's own request

    def _drain(self) -> None:
        assert self.writer
        while (chunk := self._queue.get()) is not _END:
            self.writer.write(chunk)

    def finish(self) -> bool:
        """After the last byte (blocking): commit if size and digest verify. Returns whether it did."""
        assert self.writer
        self._thread.join()
        self.writer.close()
        if not self.writer.verified(self.size) or self.writer.write_error:
            return False
        self.writer.commit()
        self.committed = True
        return True

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.answered.set()

    def skip(self, *, cached: bool = False, unusable: str = "") -> None:
        """No fetch after all: the blob is in the store already, or the store cannot take it."""
        self.cached, self.unusable = cached, unusable
        self.answered.set()

    def discard(self) -> None:
        """Drop the temporary file unless committed (blocking). The blob server notices and cuts
        the transfers it was streaming from it."""
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()
        if self.writer and not self.committed:
            self.writer.discard()
