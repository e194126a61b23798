"""The registry cache: answers manifest and blob requests from the store and fills it on a miss.

The data path, hook by hook:
- request: only a request that verifiably goes to a registry (`Interception.registry`) is
  handled; a token request to its token host is relayed, or answered with a local token when the
  token host cannot answer. Then parse the route. A manifest hit is answered at once from the
  store; a tag is first revalidated with an upstream HEAD (free under Docker Hub's rate limit),
  and served from its last known digest when upstream fails. A blob GET is answered
  with a 307 to the blob server (`blobhost.py`), which sends it from the store; on a miss, hubcache
  first starts one fill (`fill.py`) that every client asking meanwhile shares, from the fleet's
  shared store (`fleet.py`) when it has the blob, else from upstream, and the blob server streams
  the fill as it grows. A manifest miss is asked upstream by hubcache with the client's request,
  and its answer noted as pending; a 404 upstream gave this client lately is answered at once.
- responseheaders: the body of hubcache's own blob request is written into the fill; a blob
  passed through is relayed as it comes.
- response: a fill that verified is committed (one that did not is discarded, which cuts the
  transfers streaming it); a manifest is verified against its digest and stored; the miss is
  journalled.
- error: a blob request passed through (the cache folder could not take it) that broke is
  journalled.

With `offline` set, nothing goes upstream: what the store lacks is answered with a registry 404.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from . import circuits, protocol, upstream
from .access import Access, token_key
from .blobhost import BlobHost
from .fill import FILL, Fill
from .fleet import Fleet
from .hosts import Interception
from .journal import MissJournal
from .metrics import ANSWERED, RELAYED, Metrics
from .protocol import Kind, Route
from .pulls import PullLog
from .store import Manifest, Store, TagEntry

logger = logging.getLogger(__name__)

FREE_SPACE_RESERVE = 64 * 1024 * 1024  # left free for the index and other fills
PASSED = "hubcache_passed"  # on a client's blob request passed upstream: the body bytes relayed
MAX_ABSENT = 10_000  # 404s remembered at once (see _note_absent)


@dataclass
class Pending:
    """A request the store could not answer, followed until its response is complete."""

    route: Route
    stale: Manifest | None = None  # the cached manifest of a tag, served if upstream fails


class RegistryCache:
    def __init__(
        self, hosts: Interception, blobs: BlobHost, access: Access, metrics: Metrics, pulls: PullLog, fleet: Fleet | None = None
    ):
        self.hosts = hosts
        self.fleet = fleet or Fleet()  # without shared_store, a fleet of one: every look a miss
        self.blobs = blobs
        self.access = access
        self.metrics = metrics
        self.pulls = pulls
        self.store: Store | None = None
        self.journal: MissJournal | None = None
        self._pending: dict[str, Pending] = {}  # by flow id
        self._fills: dict[str, Fill] = {}  # by digest: the fills in progress
        self._absent: dict[tuple[str, str, str, str, str], tuple[float, float]] = {}  # -> (until, noted)
        self._tasks: set[asyncio.Task] = set()

    def load(self, loader):
        loader.add_option(
            "cache_dir",
            str,
            "cache",
            "Folder of the content store (diskcache) and the miss journal (misses.jsonl).",
        )
        loader.add_option(
            "tag_freshness",
            int,
            0,
            "Seconds a tag's cached digest is served without asking upstream; "
            "0 revalidates every tag request with an upstream HEAD.",
        )
        loader.add_option(
            "revalidate_timeout",
            int,
            10,
            "Seconds to wait for upstream when revalidating a tag, checking a client's access or "
            "asking for a token, before answering from the cache instead.",
        )
        loader.add_option(
            "negative_cache_seconds",
            int,
            10,
            "Seconds an upstream 404 for a tag, manifest or blob is remembered (per client "
            "credentials) and answered without asking again; 0 remembers nothing.",
        )
        loader.add_option(
            "fill_timeout",
            int,
            60,
            "Seconds upstream may stay silent while hubcache fetches a blob (before answering, or "
            "in the middle of the body) before the fetch is abandoned.",
        )
        loader.add_option(
            "offline",
            bool,
            False,
            "Never connect upstream: answer /v2/ and token requests locally, resolve tags to the "
            "last digest seen, serve manifests and blobs from the store, and answer anything "
            "missing at once with a registry 404 that says it is not in the offline cache.",
        )
        # A hit must never wait for (or fail on) an upstream connection.
        if not loader.master.options.has_changed("connection_strategy"):
            loader.master.options.connection_strategy = "lazy"

    def configure(self, updated):
        if "cache_dir" in updated:
            directory = Path(ctx.options.cache_dir).expanduser()
            if not self.store or self.store.directory != directory:
                self._open(directory)
        for name in ("tag_freshness", "revalidate_timeout", "negative_cache_seconds"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name} must be 0 or more seconds")
        if "fill_timeout" in updated and ctx.options.fill_timeout < 1:
            raise exceptions.OptionsError("fill_timeout must be 1 or more seconds")

    def _open(self, directory: Path) -> None:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            store = Store(directory)
        except OSError as e:
            raise exceptions.OptionsError(f"cache_dir: cannot use {directory}: {e.strerror or e}")
        self.done()
        self.store = store
        self.journal = MissJournal(directory / "misses.jsonl")
        logger.info(f"hubcache: content store in {directory.resolve()}")

    def done(self):
        if self.store:
            self.store.close()
        self.store = None

    # request -> route

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or upstream.is_subrequest(flow):
            return
        host = self.hosts.registry(flow)
        if host is None:
            if token_host := self.hosts.destination(flow):
                await self._token(flow, token_host)
            return
        try:
            route = protocol.parse_route(host, flow.request.path)
        except protocol.BadRequest as e:
            self._answer_error(flow, e.status, e.code, e.message)
            return
        if ctx.options.offline and (route.kind is Kind.OTHER or flow.request.method not in ("GET", "HEAD")):
            self._answer_error(flow, 405, "UNSUPPORTED", "hubcache is offline: only pulls are served")
            return
        if flow.request.method not in ("GET", "HEAD"):
            return  # pushes and everything else pass through untouched
        if route.kind is Kind.PING:
            if ctx.options.offline:
                self._answer_ping(flow)
            else:
                await self._ping(flow, route)
        elif route.kind is Kind.MANIFEST:
            await self._manifest_request(flow, route)
        elif route.kind is Kind.BLOB:
            await self._blob_request(flow, route)

    async def _ping(self, flow: http.HTTPFlow, route: Route) -> None:
        """Relay the version check, but answer it locally when upstream fails: clients ping
        before every pull, and what the cache holds must stay pullable while upstream is down."""
        answer = await upstream.send(flow, flow.request.method, ctx.options.revalidate_timeout)
        if isinstance(answer, str) or answer.status_code >= 500 or answer.status_code == 429:
            reason = answer if isinstance(answer, str) else f"upstream answered {answer.status_code}"
            logger.log(circuits.level(reason), f"{route.registry}: {reason}; answering /v2/ from the cache")
            self._answer_ping(flow)
        else:
            flow.response = answer

    async def _token(self, flow: http.HTTPFlow, host: str) -> None:
        """A token request to a registry's token host (Docker Hub's auth.docker.io): relayed by
        hubcache, and answered with a local token when the token host cannot answer (offline,
        down, 5xx, 429, silent past `revalidate_timeout`), so a client can still finish its auth
        flow and pull what the cache may give it without upstream's say: public content."""
        if flow.request.method not in ("GET", "POST"):
            return
        if not ctx.options.offline:
            answer = await upstream.send(flow, flow.request.method, ctx.options.revalidate_timeout)
            if not isinstance(answer, str) and answer.status_code < 500 and answer.status_code != 429:
                flow.metadata[RELAYED] = True
                flow.response = answer
                return
            reason = answer if isinstance(answer, str) else f"it answered {answer.status_code}"
            logger.log(circuits.level(reason, logging.INFO), f"{host}: {reason}; token answered by hubcache (cached public content only)")
        body = protocol.local_token_answer(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._answer(flow, 200, body, {"Content-Type": "application/json", "Content-Length": str(len(body))})

    async def _blob_request(self, flow: http.HTTPFlow, route: Route) -> None:
        assert self.store
        digest = route.reference
        if flow.request.method == "HEAD":
            size = await asyncio.to_thread(self.store.blob_size, digest)
            if size is None:
                await self._miss(flow, route)
            elif await self._permitted(flow, route, digest):
                self.metrics.hit("blob")
                self._answer(flow, 200, b"", protocol.blob_headers(digest, size))
            return
        fill = self._fills.get(digest)
        if fill is None:
            if await asyncio.to_thread(self.store.has_blob, digest):
                if await self._permitted(flow, route, digest):
                    self.metrics.hit("blob")
                    self._send_blob(flow, route, "cache")
                return
            if ctx.options.offline or _token_is_local(flow) or self._absent_for(flow, route) is not None:
                await self._miss(flow, route)  # answered at once: nothing is asked upstream
                return
            fill = self._fills.get(digest)  # another client may have started one meanwhile
        leader = fill is None
        if fill is None:
            fill = self._start_fill(flow, route)
        self.metrics.miss("blob")
        await fill.answered.wait()
        if leader and fill.streaming:
            # Upstream served it through this repository, to this client.
            await self._note(self.store.link, route.registry, route.name, digest)
        elif (fill.cached or fill.streaming) and not await self._permitted(flow, route, digest):
            return  # another client's fill, or a blob cached meanwhile: this client must be allowed it
        if fill.cached:
            self._send_blob(flow, route, "cache")
        elif fill.unusable:
            logger.warning(f"{route.image}: passed through, {fill.unusable}")
            self._pending[flow.id] = Pending(route)
        elif fill.streaming and fill.size is not None:
            self._send_blob(flow, route, fill.source, fill)
        elif fill.streaming:
            await fill.done.wait()  # no size from upstream: send the blob once it is whole
            if fill.committed:
                self._send_blob(flow, route, fill.source)
            else:
                self._answer_error(flow, 502, "BLOB_UNKNOWN", f"upstream's copy of {digest} did not verify")
        elif leader and fill.answer is not None:
            flow.response = fill.answer.copy()  # 401, 404, 5xx...: upstream's own answer, for this client
        elif leader:
            self._answer_error(flow, 502, "BLOB_UNKNOWN", f"{route.image}: {fill.failure}")
        # A follower of a fill that got no blob asks upstream itself, with its own credentials:
        # its request passes through untouched.

    @staticmethod
    async def _note(write, *args) -> None:
        """Write to the index in a thread; if it cannot be written (full disk, read-only folder),
        only this note is lost, with a line saying why."""
        try:
            await asyncio.to_thread(write, *args)
        except OSError as e:
            logger.warning(f"hubcache: not noted in the cache: {e.strerror or e}")

    async def _permitted(self, flow: http.HTTPFlow, route: Route, digest: str) -> bool:
        """Whether the client may have `digest` from the cache (see access.py); if not, its
        answer is set."""
        assert self.store
        refusal = await self.access.refusal(flow, route, digest, self.store)
        if refusal is not None:
            self._answer_error(flow, refusal.status, refusal.code, refusal.message, refusal.headers)
        return refusal is None

    def _send_blob(self, flow: http.HTTPFlow, route: Route, source: str, fill: Fill | None = None) -> None:
        """Send the client to the blob server: for the blob in the store, or for the file of a
        fill in progress. `source` says where its bytes came from (cache, upstream, shared), for
        the pull log and metrics."""
        tag = self.pulls.transfer(flow, route, source)
        if fill is not None:
            assert fill.size is not None
            url = self.blobs.url(route.reference, fill.name, fill.size, tag)
        else:
            url = self.blobs.url(route.reference, tag=tag)
        headers = {**protocol.API_VERSION_HEADERS, "Location": url, "Docker-Content-Digest": route.reference, "Content-Length": "0"}
        self._answer(flow, 307, b"", headers)

    def _start_fill(self, like: http.HTTPFlow, route: Route) -> Fill:
        """Fetch the blob from upstream, with the credentials of the client that asked first.
        The fill is registered before anything is awaited, so every later request joins it."""
        fill = self._fills[route.reference] = Fill(route)
        self.metrics.fills.set(len(self._fills))
        request = like.request.copy()
        for header in ("range", "if-range"):
            # The digest covers the whole blob (its identity bytes: see upstream.subrequest).
            request.headers.pop(header, None)
        task = asyncio.create_task(self._fill(like, request, fill))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def _fill(self, like: http.HTTPFlow, request: http.Request, fill: Fill) -> None:
        assert self.store
        route = fill.route
        try:
            # A fill that finished while this one was being decided on has left its blob.
            if await asyncio.to_thread(self.store.has_blob, route.reference):
                fill.skip(cached=True)
                return
            try:
                fill.writer = await asyncio.to_thread(self.store.blob_writer, route.reference)
            except OSError as e:
                fill.skip(unusable=f"the cache folder is unusable: {e.strerror or e}")
                return
            if await self._fill_from_fleet(like, fill):
                return
            redirect: http.Response | None = None
            for _ in range(upstream.MAX_REDIRECTS + 1):
                flow = upstream.subrequest(like, request)
                flow.metadata[FILL] = route.reference
                answer = await upstream.run(flow, ctx.options.fill_timeout, lambda: fill.progress)
                if fill.unusable:
                    return  # its clients went upstream themselves, and journal that
                if isinstance(answer, str):
                    fill.fail(answer)
                    logger.warning(f"{route.image}: not fetched: {answer}")
                    await self._journal(route, f"failed: {answer}")
                    return
                location = answer.headers.get("location")
                if answer.status_code in upstream.REDIRECTS and location and not fill.streaming:
                    request, redirect = upstream.redirected(request, location), answer
                    continue
                if not fill.streaming:
                    # A host that refuses hubcache without the registry's credentials may accept
                    # the client: it gets the redirect and follows it itself (uncached).
                    fill.answer = redirect if redirect and answer.status_code in (401, 403) else answer
                    if answer.status_code == 404:
                        self._note_absent(like, route)
                    fill.answered.set()
                    await self._journal(route, f"passed: upstream answered {answer.status_code}")
                    return
                await self._finish_fill(fill)
                return
            fill.fail("too many redirects")
            await self._journal(route, "failed: too many redirects")
        finally:
            if self._fills.get(route.reference) is fill:
                del self._fills[route.reference]
            if fill.writer and fill.source == "upstream":
                self.metrics.fetched.inc(fill.writer.size)
            await asyncio.to_thread(fill.discard)
            self.metrics.fills.set(len(self._fills))  # in progress until its temporary file is gone
            if not fill.committed:
                self.fleet.release(route.reference)  # a committed fill frees it once shared
            fill.done.set()

    async def _fill_from_fleet(self, like: http.HTTPFlow, fill: Fill) -> bool:
        """Feed the fill from the shared store when another node has fetched the blob, or is
        fetching it (then wait for it there). False: this node fetches it from upstream."""
        assert self.store
        route = fill.route
        blob = await self.fleet.open_blob(route.reference)
        if blob is None and not await self.fleet.claim(route.reference):
            blob = await self.fleet.await_blob(route.reference)
        if blob is None:
            return False
        with blob:
            # Only upstream knows whether this client may have it; if not, upstream tells it so.
            if await self.access.refusal(like, route, route.reference, self.store) is not None:
                return False
            if reason := self._no_room(fill, blob.size):
                fill.skip(unusable=reason)
                return True
            fill.source = "shared"
            fill.start_streaming(blob.size)
            await self.fleet.pour(blob, fill.sink)
        await self._finish_fill(fill)
        return True

    async def _finish_fill(self, fill: Fill) -> None:
        route, writer = fill.route, fill.writer
        source = "upstream" if fill.source == "upstream" else "the shared store"
        assert writer and self.store
        try:
            committed = await asyncio.to_thread(fill.finish)
        except (OSError, ValueError) as e:
            logger.warning(f"{route.image}: fetched but not cached: {e}")
            await self._journal(route, f"failed: not stored: {e}", size=writer.size)
            return
        if committed and source == "upstream":
            logger.info(f"{route.image}: cached {writer.size} bytes")
            await self._journal(route, "filled", size=writer.size)
            self.fleet.publish_blob(route.reference, self.store)
        elif committed:
            logger.info(f"{route.image}: cached {writer.size} bytes from {source}")
            await self._journal(route, f"filled from {source}", size=writer.size)
        elif writer.write_error:
            reason = writer.write_error.strerror or str(writer.write_error)
            logger.warning(f"{route.image}: not cached: {reason}")
            await self._journal(route, f"failed: not stored: {reason}", size=writer.size)
        else:
            got = f"{writer.size} bytes hashing to {writer.computed_digest}"
            logger.warning(f"{route.image}: {source} sent {got}; not stored, transfers cut")
            await self._journal(route, f"rejected: {got}", size=writer.size)

    async def _manifest_request(self, flow: http.HTTPFlow, route: Route) -> None:
        assert self.store
        accept = flow.request.headers.get_all("accept")
        if route.by_digest:
            cached = await asyncio.to_thread(self.store.get_manifest, route.reference)
            if not cached:
                cached = await self._manifest_from_fleet(route, route.reference)
            if not cached or not protocol.accepts(accept, cached.media_type):
                await self._miss(flow, route)
            elif await self._permitted(flow, route, cached.digest):
                self._answer_manifest(flow, route, cached)
            return

        entry = await asyncio.to_thread(
            self.store.get_tag, route.registry, route.name, route.reference
        )
        if entry is None:
            entry = await self._tag_from_fleet(route)
        cached = entry and await asyncio.to_thread(self.store.get_manifest, entry.digest)
        if not cached or not protocol.accepts(accept, cached.media_type):
            await self._miss(flow, route)
            return
        if ctx.options.offline or time.time() - entry.checked < self.hosts.tag_freshness(flow.request.host):
            if await self._permitted(flow, route, cached.digest):
                self._answer_manifest(flow, route, cached)
            return
        if _token_is_local(flow):
            # The token host's failure was reported when the token was issued: not again per tag.
            await self._serve_stale(flow, route, cached, "no token from the registry's token service", logging.DEBUG)
            return

        answer = await upstream.send(flow, "HEAD", ctx.options.revalidate_timeout)
        if isinstance(answer, str) or answer.status_code >= 500 or answer.status_code == 429:
            reason = answer if isinstance(answer, str) else f"upstream answered {answer.status_code}"
            await self._serve_stale(flow, route, cached, reason)
            return
        current = answer.headers.get("docker-content-digest") if answer.status_code == 200 else None
        if current == cached.digest:
            await self._note(self.store.set_tag, route.registry, route.name, route.reference, cached.digest)
            self._answer_manifest(flow, route, cached)
            return
        if current and protocol.DIGEST_RE.fullmatch(current):
            moved = await asyncio.to_thread(self.store.get_manifest, current)
            if moved and protocol.accepts(accept, moved.media_type):
                await self._note(self.store.set_tag, route.registry, route.name, route.reference, current)
                self._answer_manifest(flow, route, moved)
                return
        # The tag moved to a manifest we lack, or upstream refused (401/403/404): the client's own
        # request goes upstream and gets upstream's answer.
        await self._miss(flow, route, stale=cached)

    async def _manifest_from_fleet(self, route: Route, digest: str) -> Manifest | None:
        """A manifest another node fetched (verified again on the way), kept in the local tier.
        Serving it still needs the client's access confirmed (_permitted)."""
        assert self.store
        manifest = await self.fleet.get_manifest(digest)
        if manifest is not None:
            await self._note(self.store.put_manifest, manifest.digest, manifest.media_type, manifest.body)
            await self._journal(route, "filled from the shared store", digest=digest, size=len(manifest.body))
        return manifest

    async def _tag_from_fleet(self, route: Route) -> TagEntry | None:
        """A tag another node learned, kept in the local tier as it was confirmed there: it is
        revalidated like a tag this node learned, which costs upstream a HEAD instead of a GET,
        and when upstream is unreachable (or hubcache offline) it is what the tag resolves to."""
        assert self.store
        shared = await self.fleet.get_tag(route.registry, route.name, route.reference)
        if shared is None:
            return None
        if not await asyncio.to_thread(self.store.get_manifest, shared.digest):
            if not await self._manifest_from_fleet(route, shared.digest):
                return None
        await self._note(self.store.set_tag, route.registry, route.name, route.reference, shared.digest, shared.confirmed)
        return TagEntry(shared.digest, shared.confirmed)

    # responseheaders: a fill's body goes to its file

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        assert flow.response
        response = flow.response
        if digest := flow.metadata.get(FILL):
            fill = self._fills.get(digest)
            identity = response.headers.get("content-encoding", "identity").lower() == "identity"
            if fill and response.status_code == 200 and identity and not fill.streaming:
                length = response.headers.get("content-length", "")
                size = int(length) if length.isdigit() else None
                if reason := self._no_room(fill, size):
                    fill.skip(unusable=reason)
                    flow.kill()  # the clients fetch it themselves; this copy has nowhere to go
                    return
                fill.start_streaming(size)
                response.stream = fill.sink
            return
        if (pending := self._pending.get(flow.id)) and pending.route.kind is Kind.BLOB:
            # A blob the cache could not take is relayed as it comes, never held whole.
            flow.metadata[PASSED] = 0
            response.stream = lambda data: _counted(flow, data)

    def _no_room(self, fill: Fill, size: int | None) -> str:
        """Why the cache folder cannot take the blob now (an operator's line), or ''. The fills
        under way will take their remaining bytes too."""
        assert fill.writer
        try:
            free = shutil.disk_usage(os.path.dirname(fill.writer.path)).free
        except OSError as e:
            return f"the cache folder is unusable: {e.strerror or e}"
        promised = sum(f.size - f.writer.size for f in self._fills.values() if f.streaming and f.size and f.writer)
        if free - promised < (size or 0) + FREE_SPACE_RESERVE:
            return f"the cache folder has {free} bytes free ({promised} promised to fills under way), too few for {size or 'a'} bytes"
        return ""

    # response: commit or reject, journal the miss

    async def response(self, flow: http.HTTPFlow) -> None:
        pending = self._pending.pop(flow.id, None)
        if pending is None:
            return
        if pending.route.kind is Kind.BLOB:
            self.pulls.passed(flow, pending.route, flow.metadata.get(PASSED, 0))
            await self._journal(pending.route, f"passed: upstream answered {flow.response.status_code}")
        else:
            await self._follow_redirects(flow)
            await self._finish_manifest(flow, pending)

    async def _follow_redirects(self, flow: http.HTTPFlow) -> None:
        """Some registries (registry.k8s.io) redirect manifest requests to another host: follow
        them here, so the manifest is cached under the registry's name. If the other host refuses
        hubcache (it gets no credentials), the client gets the redirect and follows it itself."""
        assert flow.response
        request = flow.request
        for _ in range(upstream.MAX_REDIRECTS):
            location = flow.response.headers.get("location")
            if flow.response.status_code not in upstream.REDIRECTS or not location:
                return
            request = upstream.redirected(request, location)
            if request.scheme != "https":
                return  # a manifest from plain HTTP is evidence of nothing: the client decides
            answer = await upstream.run(upstream.subrequest(flow, request), ctx.options.fill_timeout)
            if isinstance(answer, str) or answer.status_code in (401, 403):
                return
            flow.response = answer

    async def _finish_manifest(self, flow: http.HTTPFlow, pending: Pending) -> None:
        assert flow.response and self.store
        route, response = pending.route, flow.response
        if pending.stale and (response.status_code >= 500 or response.status_code == 429):
            await self._serve_stale(flow, route, pending.stale, f"upstream answered {response.status_code}")
            return
        claimed = route.reference if route.by_digest else response.headers.get("docker-content-digest", "")
        if flow.request.method == "HEAD" and response.status_code == 200 and not route.by_digest:
            # dockerd resolves a tag with HEAD and then GETs by digest: learn the tag here. The
            # manifest is verified when it is fetched; until then the tag counts as uncached.
            if protocol.DIGEST_RE.fullmatch(claimed):
                try:
                    await asyncio.to_thread(
                        self.store.set_tag, route.registry, route.name, route.reference, claimed
                    )
                except OSError as e:
                    logger.warning(f"{route.image}: tag not cached: {e.strerror or e}")
        if response.status_code == 200:
            self.pulls.manifest(flow, route, "upstream", len(response.raw_content or b""))
        if response.status_code == 404:
            self._note_absent(flow, route)
        if flow.request.method != "GET" or response.status_code != 200 or response.raw_content is None:
            if response.status_code != 401:
                await self._journal(route, f"passed: upstream answered {response.status_code}")
            return
        body = response.content or b""
        algorithm = route.reference.partition(":")[0] if route.by_digest else "sha256"
        digest = protocol.digest_of(body, algorithm)
        if claimed and claimed.startswith(f"{algorithm}:") and claimed != digest:
            logger.warning(f"{route.image}: upstream manifest hashes to {digest}, not {claimed}")
            self._answer_error(flow, 502, "MANIFEST_INVALID", f"upstream sent a manifest that does not match {claimed}")
            await self._journal(route, "rejected: digest mismatch", digest=digest, size=len(body))
            return
        media_type = protocol.manifest_media_type(body, response.headers.get("content-type", ""))
        try:
            await asyncio.to_thread(self.store.put_manifest, digest, media_type, body)
            await asyncio.to_thread(self.store.link, route.registry, route.name, digest)
            if not route.by_digest:
                await asyncio.to_thread(
                    self.store.set_tag, route.registry, route.name, route.reference, digest
                )
        except OSError as e:
            logger.warning(f"{route.image}: served but not cached: {e.strerror or e}")
            await self._journal(route, f"passed: not stored: {e.strerror or e}", digest=digest)
            return
        await self._journal(route, "filled", digest=digest, size=len(body))
        tag = None if route.by_digest else (route.registry, route.name, route.reference)
        self.fleet.publish_manifest(digest, media_type, body, tag)
        await self.access.learn(flow, route, self.store)

    async def error(self, flow: http.HTTPFlow) -> None:
        pending = self._pending.pop(flow.id, None)
        if pending is None:
            return
        reason = flow.error.msg if flow.error else "unknown error"
        await self._journal(pending.route, f"failed: {reason}")

    # what upstream said is not there (negative caching)

    def _note_absent(self, flow: http.HTTPFlow, route: Route) -> None:
        """Upstream answered 404: the same client asking again within `negative_cache_seconds`
        is answered at once (a crash-looping deployment must not spend the rate limit)."""
        if not ctx.options.negative_cache_seconds:
            return
        now = time.monotonic()
        if len(self._absent) >= MAX_ABSENT:
            self._absent = {key: until for key, until in self._absent.items() if until[0] > now}
            if len(self._absent) >= MAX_ABSENT:
                self._absent.pop(next(iter(self._absent)))
        self._absent[_absent_key(flow, route)] = (now + ctx.options.negative_cache_seconds, now)

    def _absent_for(self, flow: http.HTTPFlow, route: Route) -> float | None:
        """Seconds since upstream answered 404 to this client for this, if it is remembered."""
        until, noted = self._absent.get(_absent_key(flow, route), (0.0, 0.0))
        now = time.monotonic()
        return now - noted if until > now else None

    # answers

    async def _serve_stale(self, flow: http.HTTPFlow, route: Route, cached: Manifest, reason: str, level: int | None = None) -> None:
        if not await self._permitted(flow, route, cached.digest):
            return
        logger.log(level or circuits.level(reason), f"{route.image}: {reason}; serving the cached {cached.digest}")
        self._answer_manifest(flow, route, cached)
        await self._journal(route, f"stale: {reason}", digest=cached.digest)

    async def _miss(self, flow: http.HTTPFlow, route: Route, stale: Manifest | None = None) -> None:
        """The store cannot answer: hubcache asks upstream with the client's request, and the
        answer is followed to the response hook like a client's own. If upstream cannot be
        reached, the client gets a registry error at once (not the proxy's HTML error page).
        Offline, with a local token (upstream cannot be asked for it), or after a recent 404 for
        this client, the client is told at once instead."""
        self.metrics.miss(route.kind.value)
        code = "BLOB_UNKNOWN" if route.kind is Kind.BLOB else "MANIFEST_UNKNOWN"
        if (ago := self._absent_for(flow, route)) is not None:
            self._answer_error(flow, 404, code, f"{route.image}: upstream answered 404 {ago:.0f}s ago")
            await self._journal(route, "missing: upstream answered 404 lately")
            return
        if stale is None and _token_is_local(flow) and not ctx.options.offline:
            self._answer_error(flow, 503, "UNAVAILABLE", f"{route.image} is not cached, and the registry's token service cannot be reached to fetch it")
            await self._journal(route, "failed: no token from the registry's token service")
            return
        if not ctx.options.offline:
            own = upstream.subrequest(flow, flow.request.copy())
            answer = await upstream.run(own, ctx.options.fill_timeout)
            if unread := own.metadata.get(upstream.UNREAD):
                self._answer_error(flow, 502, "MANIFEST_INVALID", f"{route.image}: {unread}")
                await self._journal(route, f"rejected: {unread}")
            elif isinstance(answer, str) and stale:
                await self._serve_stale(flow, route, stale, answer)
            elif isinstance(answer, str):
                self._answer_error(flow, 502, "UNAVAILABLE", f"{route.registry} cannot be reached: {answer}")
                await self._journal(route, f"failed: {answer}")
            else:
                self._pending[flow.id] = Pending(route, stale=stale)
                flow.metadata[RELAYED] = True
                flow.response = answer
            return
        what = f"blob {route.reference} of {route.registry}/{route.name}" if route.kind is Kind.BLOB else route.image
        self._answer_error(flow, 404, code, f"{what} is not in the offline cache")
        await self._journal(route, "missing: offline")

    def _answer_ping(self, flow: http.HTTPFlow) -> None:
        self._answer(flow, 200, b"{}", {**protocol.API_VERSION_HEADERS, "Content-Type": "application/json", "Content-Length": "2"})

    def _answer_manifest(self, flow: http.HTTPFlow, route: Route, manifest: Manifest) -> None:
        """Answer from the store: a hit."""
        headers = protocol.manifest_headers(manifest.digest, manifest.media_type, len(manifest.body))
        body = manifest.body if flow.request.method == "GET" else b""
        self._answer(flow, 200, body, headers)
        self.metrics.hit("manifest")
        self.metrics.sent("cache", len(body))
        self.pulls.manifest(flow, route, "cache", len(body))

    def _answer_error(self, flow: http.HTTPFlow, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        body = protocol.error_body(code, message)
        self._answer(flow, status, body if flow.request.method != "HEAD" else b"", {**protocol.error_headers(len(body)), **(extra or {})})

    @staticmethod
    def _answer(flow: http.HTTPFlow, status: int, body: bytes, headers: dict[str, str]) -> None:
        flow.metadata[ANSWERED] = True
        flow.response = http.Response.make(status, body, headers)
        # A HEAD answer states the size of the body it does not carry.
        flow.response.headers["Content-Length"] = headers["Content-Length"]

    async def _journal(self, route: Route, outcome: str, digest: str | None = None, size: int | None = None) -> None:
        assert self.journal
        await asyncio.to_thread(
            self.journal.record,
            kind=route.kind.value,
            registry=route.registry,
            repository=route.name,
            reference=route.reference,
            digest=digest or (route.reference if route.by_digest else None),
            size=size,
            outcome=outcome,
        )


def _counted(flow: http.HTTPFlow, data: bytes) -> bytes:
    flow.metadata[PASSED] += len(data)
    return data


def _token_is_local(flow: http.HTTPFlow) -> bool:
    """The client holds a token hubcache issued because the token host could not (see _token)."""
    return protocol.has_local_token(flow.request.headers.get("authorization", ""))


def _absent_key(flow: http.HTTPFlow, route: Route) -> tuple[str, str, str, str, str]:
    # Per client credentials: what one account cannot see, another may.
    return (token_key(flow), route.kind.value, route.registry, route.name, route.reference)
