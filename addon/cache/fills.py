"""Fills: one fetch of a blob into the store (from the fleet's shared store or upstream), shared by
every client that wants it meanwhile and never aborted by a client that leaves; `Fills` owns each
one's life. The body goes into a temporary file that the blob server streams as it grows: on the
fetch thread (or a shared store's pour) it is hashed and written right there, while the bytes are
still in the CPU's cache; on mitmproxy's event loop a writer thread does it. It is committed only
if it verifies."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import shutil
import threading
import time
from enum import Enum
from pathlib import Path

from mitmproxy import ctx, http

from ..fleet.node import Fleet
from ..mitm import internals
from ..mitm.flows import Mark, Source
from ..observe.metrics import Metrics
from ..registry import protocol
from ..registry.protocol import Route
from ..storage.folder import CacheFolder
from ..storage.journal import Outcome
from ..storage.store import BlobWriter
from ..units import decimal
from ..upstream import client as upstream
from .access import Access
from .misses import Misses

logger = logging.getLogger(__name__)

_END = None
# Chunks from the event loop waiting for the writer thread. Nothing reads hubcache's own request,
# so upstream is read as fast as it sends: when the disk falls behind, the loop's reading waits
# here (backpressure) rather than the proxy's memory growing with the blob.
QUEUED_CHUNKS = 16
FREE_SPACE_RESERVE = 64 * 1024 * 1024  # left free for the index and other fills
# A fill looks at the room left each time this many more bytes came: what upstream announced
# was checked before the first byte, but an answer without Content-Length announced nothing.
ROOM_CHECK = 16 * 1024 * 1024


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
            with self._lock:
                if not self._discarded:  # cut: the fetch ends, and its last bytes have nowhere to go
                    self._write(data)
        return []  # nobody reads hubcache's own request

    def _drain(self) -> None:
        while (chunk := self._queue.get()) is not _END:
            self._write(chunk)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.writer
        before = self.writer.size
        self.writer.write(data)
        if before // ROOM_CHECK != self.writer.size // ROOM_CHECK:
            self.writer.keep_free(FREE_SPACE_RESERVE)

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


class Fills:
    """The fills under way, by digest, and each one's life: deciding (the store, the fleet's shared
    store, upstream), the free space promised across fills, the body's verification and commit,
    and its journal line. `BlobRequests` starts one per missing blob and follows it."""

    def __init__(self, folder: CacheFolder, misses: Misses, access: Access, metrics: Metrics, fleet: Fleet, out: upstream.Upstream):
        self.folder = folder
        self.upstream = out
        self.misses = misses
        self.access = access
        self.metrics = metrics
        self.fleet = fleet
        self.under_way: dict[str, Fill] = {}  # by digest
        self.tasks: set[asyncio.Task] = set()

    def get(self, digest: str) -> Fill | None:
        """The fill of `digest` under way, if there is one."""
        return self.under_way.get(digest)

    def start(self, like: http.HTTPFlow, route: Route) -> Fill:
        """Fetch the blob from upstream, with the credentials of the client that asked first.
        The fill is registered before anything is awaited, so every later request joins it."""
        fill = self.under_way[route.reference] = Fill(route)
        self.metrics.fills.set(len(self.under_way))
        # The whole blob, whatever range the client asked: the digest covers all of its bytes.
        request = upstream.request_for(like, route, "GET")
        task = asyncio.create_task(self._fill(like, request, fill))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return fill

    async def _fill(self, like: http.HTTPFlow, request: http.Request, fill: Fill) -> None:
        store = self.folder.open_store()
        route = fill.route
        try:
            # A fill that finished while this one was being decided on has left its blob.
            if await asyncio.to_thread(store.has_blob, route.reference):
                fill.found_cached()
                return
            try:
                fill.writer = await asyncio.to_thread(store.blob_writer, route.reference)
            except OSError as e:
                fill.unusable(f"the cache folder is unusable: {e.strerror or e}")
                return
            if not await self._fill_from_fleet(like, fill):
                await self._fill_from_upstream(like, request, fill)
        finally:
            if fill.state is State.DECIDING:  # an error nobody expected: its clients must not wait forever
                fill.fail("hubcache could not fetch it")
            if self.under_way.get(route.reference) is fill:
                del self.under_way[route.reference]
            if fill.writer and fill.source is Source.UPSTREAM:
                self.metrics.fetched.inc(fill.writer.size)
            await asyncio.to_thread(fill.discard)
            self.metrics.fills.set(len(self.under_way))  # in progress until its temporary file is gone
            if fill.state is not State.COMMITTED:
                self.fleet.release(route.reference)  # a committed fill frees it once shared
            fill.done.set()

    async def _fill_from_upstream(self, like: http.HTTPFlow, request: http.Request, fill: Fill) -> None:
        route = fill.route
        redirect: http.Response | None = None
        for _ in range(upstream.MAX_REDIRECTS + 1):
            flow = upstream.subrequest(like, request)
            flow.metadata[Mark.FILL] = route.reference
            try:
                answer = await self.upstream.run(flow, ctx.options.fill_timeout, lambda: fill.progress, self._sink)
            except upstream.UpstreamError as e:
                if fill.state is State.UNUSABLE:
                    return  # its clients went upstream themselves, and journal that
                fill.fail(str(e))
                logger.warning(f"{route.image}: not fetched: {e}")
                await self.folder.journal_miss(route, Outcome.FAILED, str(e))
                return
            if fill.state is State.UNUSABLE:
                return
            location = answer.headers.get("location")
            if fill.state is State.DECIDING and answer.status_code in protocol.REDIRECTS and location:
                try:
                    request, redirect = upstream.redirected(request, location), answer
                except upstream.Unfollowable as e:
                    fill.fail(str(e))
                    logger.warning(f"{route.image}: not fetched: {e}")
                    await self.folder.journal_miss(route, Outcome.FAILED, str(e))
                    return
                continue
            if fill.state is State.DECIDING:
                # A host that refuses hubcache without the registry's credentials may accept the
                # client: it gets the redirect and follows it itself (uncached).
                if answer.status_code == 404:
                    self.misses.note_absent(like, route)
                fill.refused(redirect if redirect and answer.status_code in (401, 403) else answer)
                await self.folder.journal_miss(route, Outcome.PASSED, f"upstream answered {answer.status_code}")
                return
            await self._finish_fill(fill)
            return
        fill.fail("too many redirects")
        await self.folder.journal_miss(route, Outcome.FAILED, "too many redirects")

    async def _fill_from_fleet(self, like: http.HTTPFlow, fill: Fill) -> bool:
        """Feed the fill from the shared store when another node has fetched the blob, or is
        fetching it (then wait for it there). False: this node fetches it from upstream."""
        store = self.folder.open_store()
        route = fill.route
        blob = await self.fleet.blob_or_claim(route.reference)
        if blob is None:
            return False
        with blob:
            # Only upstream knows whether this client may have it; if not, upstream tells it so.
            if await self.access.refusal(like, route, route.reference, store) is not None:
                return False
            if reason := self._no_room(fill, blob.size):
                fill.unusable(reason)
                return True
            fill.source = Source.SHARED
            fill.start_streaming(blob.size)
            await self.fleet.pour(blob, fill.sink)
        await self._finish_fill(fill)
        return True

    async def _finish_fill(self, fill: Fill) -> None:
        route, writer, store = fill.route, fill.writer, self.folder.open_store()
        source = "upstream" if fill.source is Source.UPSTREAM else "the shared store"
        assert writer
        try:
            committed = await asyncio.to_thread(fill.finish)
        except (OSError, ValueError) as e:
            fill.fail(str(e))
            logger.warning(f"{route.image}: fetched but not cached: {e}")
            await self.folder.journal_miss(route, Outcome.FAILED, f"not stored: {e}", size=writer.size)
            return
        if committed and fill.source is Source.UPSTREAM:
            logger.info(f"{route.image}: cached {writer.size} bytes")
            await self.folder.journal_miss(route, Outcome.FILLED, None, size=writer.size)
            self.fleet.publish_blob(route.reference, store)
        elif committed:
            logger.info(f"{route.image}: cached {writer.size} bytes from {source}")
            await self.folder.journal_miss(route, Outcome.FILLED, f"from {source}", size=writer.size)
        elif writer.write_error:
            reason = writer.write_error.strerror or str(writer.write_error)
            logger.warning(f"{route.image}: not cached: {reason}")
            await self.folder.journal_miss(route, Outcome.FAILED, f"not stored: {reason}", size=writer.size)
        else:
            got = f"{writer.size} bytes hashing to {writer.computed_digest}"
            logger.warning(f"{route.image}: {source} sent {got}; not stored, transfers cut")
            await self.folder.journal_miss(route, Outcome.REJECTED, got, size=writer.size)
            if fill.source is Source.SHARED:
                await self.fleet.discard_blob(route.reference)

    def _sink(self, flow: http.HTTPFlow) -> internals.Stream | None:
        """Upstream's answer to a fill's request, its head in: its body goes to the fill's file
        when it is the blob (handed over by whoever carries the request, not through a hook)."""
        assert flow.response
        response = flow.response
        fill = self.under_way.get(flow.metadata[Mark.FILL])
        identity = response.headers.get("content-encoding", "identity").lower() == "identity"
        if fill and response.status_code == 200 and identity and fill.state is State.DECIDING:
            size = decimal(response.headers.get("content-length", ""))
            if reason := self._no_room(fill, size):
                fill.unusable(reason)
                flow.kill()  # the clients fetch it themselves; this copy has nowhere to go
                return None
            fill.start_streaming(size)
            return fill.sink
        return None

    def _no_room(self, fill: Fill, size: int | None) -> str:
        """Why the cache folder cannot take the blob now (an operator's line), or ''. The fills
        under way will take their remaining bytes too."""
        assert fill.writer
        try:
            free = shutil.disk_usage(os.path.dirname(fill.writer.path)).free
        except OSError as e:
            return f"the cache folder is unusable: {e.strerror or e}"
        promised = sum(
            f.size - f.writer.size for f in self.under_way.values() if f.state is State.STREAMING and f.size and f.writer
        )
        if free - promised < (size or 0) + FREE_SPACE_RESERVE:
            return f"the cache folder has {free} bytes free ({promised} promised to fills under way), too few for {size or 'a'} bytes"
        return ""


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
