"""Blob requests: answered from the store through the blob server, or filled once from the fleet's
shared store or upstream while every client asking meanwhile shares the fill.

A blob GET is answered with a 307 to hubcache's blob server (`blobhost.py`), which sends the blob
from the store. On a miss, one fill (`fill.py`) starts; the clients wait for its answer and then
follow it: the blob server streams the fill's file as it grows, and a fill that does not verify
is discarded (which cuts those transfers). A client the fill cannot serve (the cache folder is
full, upstream refused hubcache) asks upstream itself, through `Misses`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

from mitmproxy import ctx, http

from ..blobserver.host import BlobHost
from ..fleet.node import Fleet
from ..mitm import answers, internals
from ..mitm.flows import Mark, Source
from ..observe.metrics import Metrics
from ..observe.pull_log import PullLog
from ..registry import protocol
from ..registry.protocol import Route
from ..storage.folder import CacheFolder
from ..upstream import client as upstream
from .access import Access, holds_local_token
from .fills import Fill, State
from .misses import Misses

logger = logging.getLogger(__name__)

FREE_SPACE_RESERVE = 64 * 1024 * 1024  # left free for the index and other fills


class BlobRequests:
    def __init__(
        self,
        folder: CacheFolder,
        misses: Misses,
        blobs: BlobHost,
        access: Access,
        metrics: Metrics,
        pulls: PullLog,
        fleet: Fleet,
        out: upstream.Upstream,
    ):
        self.folder = folder
        self.upstream = out
        self.misses = misses
        self.blobs = blobs
        self.access = access
        self.metrics = metrics
        self.pulls = pulls
        self.fleet = fleet
        self.fills: dict[str, Fill] = {}  # by digest: the fills in progress
        self.tasks: set[asyncio.Task] = set()

    async def handle(self, flow: http.HTTPFlow, route: Route) -> None:
        store = self.folder.store
        assert store
        digest = route.reference
        if flow.request.method == "HEAD":
            size = await asyncio.to_thread(store.blob_size, digest)
            if size is None:
                await self.misses.ask(flow, route)
            elif await self.access.permit(flow, route, digest, store):
                self.metrics.hit("blob")
                answers.answer(flow, 200, b"", protocol.blob_headers(digest, size))
            return
        fill = self.fills.get(digest)
        if fill is None:
            if await asyncio.to_thread(store.has_blob, digest):
                if await self.access.permit(flow, route, digest, store):
                    self.metrics.hit("blob")
                    self._send(flow, route, Source.CACHE)
                return
            if ctx.options.offline or holds_local_token(flow) or self.misses.absent_for(flow, route) is not None:
                await self.misses.ask(flow, route)  # answered at once: nothing is asked upstream
                return
            fill = self.fills.get(digest)  # another client may have started one meanwhile
        leader = fill is None
        if fill is None:
            fill = self._start_fill(flow, route)
        self.metrics.miss("blob")
        await fill.answered.wait()
        await self._follow(flow, route, fill, leader)

    async def _follow(self, flow: http.HTTPFlow, route: Route, fill: Fill, leader: bool) -> None:
        """Answer a client from its fill, once the fill is answered. A follower of a fill that got
        no blob asks upstream itself, with its own credentials: its request passes through."""
        store = self.folder.store
        assert store
        state = fill.state
        if leader and state.has_body:
            # Upstream served it through this repository, to this client.
            await self.folder.note(store.link, route.registry, route.name, route.reference)
        elif (state is State.CACHED or state.has_body) and not await self.access.permit(flow, route, route.reference, store):
            return  # another client's fill, or a blob cached meanwhile: this client must be allowed it
        if fill.state is State.STREAMING and fill.size is None:
            await fill.done.wait()  # no size from upstream: send the blob once it is whole
        match fill.state:
            case State.CACHED:
                self._send(flow, route, Source.CACHE)
            case State.UNUSABLE:
                logger.warning(f"{route.image}: passed through, {fill.reason}")
                self.misses.follow(flow, route)
            case State.STREAMING:
                self._send(flow, route, fill.source, fill)
            case State.COMMITTED:
                self._send(flow, route, fill.source)
            case State.REJECTED:
                why = fill.reason or f"upstream's copy of {route.reference} did not verify"
                answers.error(flow, 502, "BLOB_UNKNOWN", f"{route.image}: {why}")
            case State.REFUSED if leader:
                assert fill.answer
                flow.response = fill.answer.copy()  # 401, 404, 5xx...: upstream's own answer, for this client
            case State.FAILED if leader:
                answers.error(flow, 502, "BLOB_UNKNOWN", f"{route.image}: {fill.reason}")

    def _send(self, flow: http.HTTPFlow, route: Route, source: Source, fill: Fill | None = None) -> None:
        """Send the client to the blob server: for the blob in the store, or for the file of a
        fill in progress. `source` says where its bytes came from, for the pull log and metrics."""
        if self.blobs.restarting:
            answers.error(flow, 503, "UNAVAILABLE", "hubcache's blob server is starting again: retry in a moment")
            return
        tag = self.pulls.transfer(flow, route, source)
        if fill is not None:
            assert fill.size is not None
            url = self.blobs.url(route.reference, fill.name, fill.size, tag)
        else:
            url = self.blobs.url(route.reference, tag=tag)
        answers.blob_redirect(flow, route.reference, url)

    # a fill's life

    def _start_fill(self, like: http.HTTPFlow, route: Route) -> Fill:
        """Fetch the blob from upstream, with the credentials of the client that asked first.
        The fill is registered before anything is awaited, so every later request joins it."""
        fill = self.fills[route.reference] = Fill(route)
        self.metrics.fills.set(len(self.fills))
        # The whole blob, whatever range the client asked: the digest covers all of its bytes.
        request = upstream.request_for(like, route, "GET")
        task = asyncio.create_task(self._fill(like, request, fill))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return fill

    async def _fill(self, like: http.HTTPFlow, request: http.Request, fill: Fill) -> None:
        store = self.folder.store
        assert store
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
            if self.fills.get(route.reference) is fill:
                del self.fills[route.reference]
            if fill.writer and fill.source is Source.UPSTREAM:
                self.metrics.fetched.inc(fill.writer.size)
            await asyncio.to_thread(fill.discard)
            self.metrics.fills.set(len(self.fills))  # in progress until its temporary file is gone
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
                await self.folder.journal_miss(route, f"failed: {e}")
                return
            if fill.state is State.UNUSABLE:
                return
            location = answer.headers.get("location")
            if fill.state is State.DECIDING and answer.status_code in protocol.REDIRECTS and location:
                try:
                    request, redirect = upstream.redirected(request, location), answer
                except upstream.Renamed as e:
                    fill.fail(str(e))
                    logger.warning(f"{route.image}: not fetched: {e}")
                    await self.folder.journal_miss(route, f"failed: {e}")
                    return
                continue
            if fill.state is State.DECIDING:
                # A host that refuses hubcache without the registry's credentials may accept the
                # client: it gets the redirect and follows it itself (uncached).
                if answer.status_code == 404:
                    self.misses.note_absent(like, route)
                fill.refused(redirect if redirect and answer.status_code in (401, 403) else answer)
                await self.folder.journal_miss(route, f"passed: upstream answered {answer.status_code}")
                return
            await self._finish_fill(fill)
            return
        fill.fail("too many redirects")
        await self.folder.journal_miss(route, "failed: too many redirects")

    async def _fill_from_fleet(self, like: http.HTTPFlow, fill: Fill) -> bool:
        """Feed the fill from the shared store when another node has fetched the blob, or is
        fetching it (then wait for it there). False: this node fetches it from upstream."""
        store = self.folder.store
        assert store
        route = fill.route
        blob = await self.fleet.open_blob(route.reference)
        if blob is None:
            if not await self.fleet.claim(route.reference):
                blob = await self.fleet.await_blob(route.reference)
            elif self.fleet.lock is not None and (blob := await self.fleet.open_blob(route.reference)) is not None:
                # Its holder put it and let go between this node's look and its lock.
                self.fleet.release(route.reference)
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
        route, writer, store = fill.route, fill.writer, self.folder.store
        source = "upstream" if fill.source is Source.UPSTREAM else "the shared store"
        assert writer and store
        try:
            committed = await asyncio.to_thread(fill.finish)
        except (OSError, ValueError) as e:
            fill.fail(str(e))
            logger.warning(f"{route.image}: fetched but not cached: {e}")
            await self.folder.journal_miss(route, f"failed: not stored: {e}", size=writer.size)
            return
        if committed and fill.source is Source.UPSTREAM:
            logger.info(f"{route.image}: cached {writer.size} bytes")
            await self.folder.journal_miss(route, "filled", size=writer.size)
            self.fleet.publish_blob(route.reference, store)
        elif committed:
            logger.info(f"{route.image}: cached {writer.size} bytes from {source}")
            await self.folder.journal_miss(route, f"filled from {source}", size=writer.size)
        elif writer.write_error:
            reason = writer.write_error.strerror or str(writer.write_error)
            logger.warning(f"{route.image}: not cached: {reason}")
            await self.folder.journal_miss(route, f"failed: not stored: {reason}", size=writer.size)
        else:
            got = f"{writer.size} bytes hashing to {writer.computed_digest}"
            logger.warning(f"{route.image}: {source} sent {got}; not stored, transfers cut")
            await self.folder.journal_miss(route, f"rejected: {got}", size=writer.size)
            if fill.source is Source.SHARED:
                await self.fleet.discard_blob(route.reference)

    def _sink(self, flow: http.HTTPFlow) -> internals.Stream | None:
        """Upstream's answer to a fill's request, its head in: its body goes to the fill's file
        when it is the blob (handed over by whoever carries the request, not through a hook)."""
        assert flow.response
        response = flow.response
        fill = self.fills.get(flow.metadata[Mark.FILL])
        identity = response.headers.get("content-encoding", "identity").lower() == "identity"
        if fill and response.status_code == 200 and identity and fill.state is State.DECIDING:
            length = response.headers.get("content-length", "")
            size = int(length) if length.isdigit() else None
            if reason := self._no_room(fill, size):
                fill.unusable(reason)
                flow.kill()  # the clients fetch it themselves; this copy has nowhere to go
                return None
            fill.start_streaming(size)
            return fill.sink
        return None

    # hooks' share: a blob passed through

    @staticmethod
    def relay(flow: http.HTTPFlow) -> None:
        """A blob the cache could not take is relayed as it comes, never held whole."""
        assert flow.response
        flow.metadata[Mark.PASSED] = 0
        flow.response.stream = lambda data: _counted(flow, data)

    async def passed(self, flow: http.HTTPFlow, route: Route) -> None:
        assert flow.response
        self.pulls.passed(flow, route, flow.metadata.get(Mark.PASSED, 0))
        await self.folder.journal_miss(route, f"passed: upstream answered {flow.response.status_code}")

    def _no_room(self, fill: Fill, size: int | None) -> str:
        """Why the cache folder cannot take the blob now (an operator's line), or ''. The fills
        under way will take their remaining bytes too."""
        assert fill.writer
        try:
            free = shutil.disk_usage(os.path.dirname(fill.writer.path)).free
        except OSError as e:
            return f"the cache folder is unusable: {e.strerror or e}"
        promised = sum(
            f.size - f.writer.size for f in self.fills.values() if f.state is State.STREAMING and f.size and f.writer
        )
        if free - promised < (size or 0) + FREE_SPACE_RESERVE:
            return f"the cache folder has {free} bytes free ({promised} promised to fills under way), too few for {size or 'a'} bytes"
        return ""


def _counted(flow: http.HTTPFlow, data: bytes) -> bytes:
    flow.metadata[Mark.PASSED] += len(data)
    return data
