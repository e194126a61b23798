"""Filling the store from an upstream response that streams through mitmproxy to the client.

The `Tee` is the response's stream callable: it passes every chunk on to the client and hands a
copy to a writer thread that hashes it and writes it to a temporary file, so no disk work and no
hashing happens on mitmproxy's event loop. The last chunk is held back until the whole body has
verified: a client never receives the end of a body whose digest is wrong; the addon then kills
the flow and the client sees a broken transfer, which it retries.
"""

from __future__ import annotations

import logging
import queue
import threading

from .store import BlobWriter

logger = logging.getLogger(__name__)

_END = None


class Tee:
    def __init__(self, writer: BlobWriter, expected_size: int | None):
        self.writer = writer
        self.expected_size = expected_size
        self.finished = False  # the callable has seen the end of the body
        self.verified = False
        self._held = b""
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name="hubcache fill", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (chunk := self._queue.get()) is not _END:
            self.writer.write(chunk)

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        # mitmproxy calls this on its event loop and must never see an exception from it.
        try:
            if data:
                self._queue.put(data)
                out, self._held = self._held, data
                return [out] if out else []
            self._queue.put(_END)
            self._thread.join()
            self.finished = True
            self.verified = self.writer.verified(self.expected_size)
            return [self._held] if self.verified else []
        except Exception:
            logger.exception("blob fill failed; the transfer will be aborted")
            self.finished = True
            self.verified = False
            return []

    def abandon(self) -> None:
        """The transfer broke: stop the writer thread and drop the partial file (blocking)."""
        if not self.finished:
            self._queue.put(_END)
            self._thread.join()
            self.finished = True
        self.writer.discard()
