"""Blob requests: for a blob in the store, its bytes (a small one) or a 307 to the blob server,
else one fill (`fills.py`) from the fleet's shared store or upstream that every client asking
meanwhile shares."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, http

from ..blobserver.host import BlobHost
from ..mitm import answers
from ..mitm.answers import Decision, PassThrough, RegistryError, Relay, Serve
from ..mitm.flows import Mark, Source
from ..observe.metrics import Metrics
from ..observe.pull_log import PullLog
from ..proxy.routes import route_of
from ..registry import protocol
from ..registry.protocol import ErrorCode, Route
from ..storage.folder import CacheFolder
from ..storage.journal import Outcome
from .access import Access, holds_local_token
from .fills import Fill, Fills, State
from .misses import Misses

logger = logging.getLogger(__name__)

class BlobRequests:
    def __init__(self, folder: CacheFolder, misses: Misses, blobs: BlobHost, access: Access, metrics: Metrics, pulls: PullLog, fills: Fills):
        self.folder = folder
        self.misses = misses
        self.blobs = blobs
        self.access = access
        self.metrics = metrics
        self.pulls = pulls
        self.fills = fills

    async def handle(self, flow: http.HTTPFlow, route: Route) -> Decision:
        store = self.folder.open_store()
        digest = route.reference
        if flow.request.method == "HEAD":
            size = await asyncio.to_thread(store.blob_size, digest)
            if size is None:
                return await self._ask(flow, route)
            if refused := await self.access.refusal(flow, route, digest, store):
                return refused
            self.metrics.hit("blob")
            return Serve(200, b"", protocol.blob_headers(digest, size))
        fill = self.fills.get(digest)
        if fill is None:
            if (hit := await self._from_store(flow, route)) is not None:
                return hit
            if ctx.options.offline or holds_local_token(flow) or self.misses.absent_for(flow, route) is not None:
                return await self.misses.ask(flow, route)  # answered at once: nothing is asked upstream
            fill = self.fills.get(digest)  # another client may have started one meanwhile
        leader = fill is None
        if fill is None:
            fill = self.fills.start(flow, route)
        self.metrics.miss("blob")
        await fill.answered.wait()
        return await self._follow(flow, route, fill, leader)

    async def _from_store(self, flow: http.HTTPFlow, route: Route) -> Decision | None:
        """The answer to a blob GET from the store, if it holds the blob whole (Store.open_blob):
        a small one in the answer itself (hashed again: one that no longer verifies is dropped,
        and a miss), a larger one or a range of it by the blob server."""
        store = self.folder.open_store()
        digest = route.reference
        inline_max = -1 if "range" in flow.request.headers else ctx.options.blob_inline_max
        found = await asyncio.to_thread(store.blob_to_answer, digest, inline_max)
        if found is None:
            return None
        if refused := await self.access.refusal(flow, route, digest, store):
            return refused  # what was read for it is dropped unsent
        self.metrics.hit("blob")
        _, body = found
        if body is None:
            return self._send(flow, route, Source.CACHE)
        self.metrics.sent(Source.CACHE, len(body))
        self.pulls.blob(flow, route, Source.CACHE, len(body))
        return answers.blob(digest, body)

    async def _ask(self, flow: http.HTTPFlow, route: Route) -> Decision:
        """A blob HEAD the store cannot answer: upstream's answer, relayed and journalled."""
        decision = await self.misses.ask(flow, route)
        if isinstance(decision, Relay):
            self.pulls.blob(flow, route, Source.UPSTREAM, 0)  # a HEAD: no body
            await self.folder.journal_miss(route, Outcome.PASSED, f"upstream answered {decision.response.status_code}")
        return decision

    async def _follow(self, flow: http.HTTPFlow, route: Route, fill: Fill, leader: bool) -> Decision:
        """Answer a client from its fill, once the fill is answered. A follower of a fill that got
        no blob asks upstream itself, with its own credentials: its request passes through."""
        store = self.folder.open_store()
        state = fill.state
        if leader and state.has_body:
            # Upstream served it through this repository, to this client.
            await self.folder.note(store.link, route.registry, route.name, route.reference)
        elif (state is State.CACHED or state.has_body) and (refused := await self.access.refusal(flow, route, route.reference, store)):
            return refused  # another client's fill, or a blob cached meanwhile: this client must be allowed it
        if fill.state is State.STREAMING and fill.size is None:
            await fill.done.wait()  # no size from upstream: send the blob once it is whole
        match fill.state:
            case State.CACHED:
                return self._send(flow, route, Source.CACHE)
            case State.UNUSABLE:
                logger.warning(f"{route.image}: passed through, {fill.reason}")
                flow.metadata[Mark.PASSED] = 0  # followed: relayed as it comes, and journalled (below)
                return PassThrough()
            case State.STREAMING:
                return self._send(flow, route, fill.source, fill)
            case State.COMMITTED:
                return self._send(flow, route, fill.source)
            case State.REJECTED:
                why = fill.reason or f"upstream's copy of {route.reference} did not verify"
                return RegistryError(ErrorCode.UPSTREAM_FAILED, f"{route.image}: {why}")
            case State.REFUSED if leader:
                assert fill.answer
                return Relay(fill.answer.copy(), counted=False)  # 401, 404, 5xx...: upstream's own answer, for this client
            case State.FAILED if leader:
                return RegistryError(ErrorCode.UPSTREAM_FAILED, f"{route.image}: {fill.reason}")
            case State.REFUSED | State.FAILED:
                return PassThrough()  # upstream refused or failed the client that asked first: this one asks itself
        raise AssertionError(f"a fill's clients follow it once it is answered, not while {fill.state.value}")

    def _send(self, flow: http.HTTPFlow, route: Route, source: Source, fill: Fill | None = None) -> Decision:
        """Send the client to the blob server: for the blob in the store, or for the file of a
        fill in progress. `source` says where its bytes came from, for the pull log and metrics."""
        if self.blobs.restarting:
            return RegistryError(ErrorCode.UNAVAILABLE, "hubcache's blob server is starting again: retry in a moment")
        tag = self.pulls.transfer(flow, route, source)
        if fill is not None:
            assert fill.size is not None
            url = self.blobs.url(route.reference, fill.name, fill.size, tag)
        else:
            url = self.blobs.url(route.reference, tag=tag)
        return answers.blob_redirect(route.reference, url)

    # a blob passed through

    @staticmethod
    def relay(flow: http.HTTPFlow) -> None:
        """A blob passed through (the cache could not take it) is relayed as it comes, never held whole."""
        if Mark.PASSED in flow.metadata and flow.response:
            flow.response.stream = lambda data: _counted(flow, data)

    async def passed(self, flow: http.HTTPFlow) -> None:
        """The answer to a blob request passed through: in the pull log and the journal."""
        route = route_of(flow)
        if Mark.PASSED not in flow.metadata or route is None:
            return
        if flow.response:
            self.pulls.blob(flow, route, Source.UPSTREAM, flow.metadata[Mark.PASSED])
            await self.folder.journal_miss(route, Outcome.PASSED, f"upstream answered {flow.response.status_code}")
        else:
            await self.folder.journal_miss(route, Outcome.FAILED, flow.error.msg if flow.error else "unknown error")


def _counted(flow: http.HTTPFlow, data: bytes) -> bytes:
    flow.metadata[Mark.PASSED] += len(data)
    return data
