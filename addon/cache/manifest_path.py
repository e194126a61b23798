"""Manifest requests, by tag or by digest, and referrers: answered from the store, or asked upstream
and stored once verified. A tag is revalidated with an upstream HEAD (unless `tag_freshness` says it
is fresh) and kept per kind of client (`store.TagKind`), so no `Accept` re-points it for the others."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from mitmproxy import ctx, http

from ..fleet.node import Fleet
from ..mitm import answers
from ..mitm.answers import Decision, RegistryError, Relay, Serve
from ..mitm.flows import Mark, Source
from ..observe.metrics import Metrics
from ..observe.pull_log import PullLog
from ..proxy.interception import Interception
from ..registry import manifests, protocol
from ..registry.protocol import ErrorCode, Route
from ..storage.folder import CacheFolder
from ..storage.journal import Outcome
from ..storage.store import Manifest, Store, TagEntry, TagKind
from ..upstream import circuits
from ..upstream import client as upstream
from .access import Access, holds_local_token
from .misses import Misses

logger = logging.getLogger(__name__)


class ManifestRequests:
    def __init__(
        self,
        hosts: Interception,
        folder: CacheFolder,
        misses: Misses,
        access: Access,
        metrics: Metrics,
        pulls: PullLog,
        fleet: Fleet,
        out: upstream.Upstream,
    ):
        self.hosts = hosts
        self.upstream = out
        self.folder = folder
        self.misses = misses
        self.access = access
        self.metrics = metrics
        self.pulls = pulls
        self.fleet = fleet

    async def handle(self, flow: http.HTTPFlow, route: Route) -> Decision:
        store = self.folder.open_store()
        accept = flow.request.headers.get_all("accept")
        if route.by_digest:
            cached = await asyncio.to_thread(store.get_manifest, route.reference)
            if not cached:
                cached = await self._from_fleet(route, route.reference)
            if not cached or not protocol.accepts(accept, cached.media_type):
                return await self._ask(flow, route)
            if refused := await self.access.refusal(flow, route, cached.digest, store):
                return refused
            return self._serve(flow, route, cached)

        entry, cached = await asyncio.to_thread(_cached_tag, store, route, accept)
        if entry is None and tag_kind(flow) is TagKind.INDEX:
            entry = await self._tag_from_fleet(route)
            cached = await asyncio.to_thread(store.get_manifest, entry.digest) if entry else None
        if not entry or not cached or not protocol.accepts(accept, cached.media_type):
            return await self._ask(flow, route)
        if ctx.options.offline or time.time() - entry.checked < self.hosts.tag_freshness(flow.request.host):
            if refused := await self.access.refusal(flow, route, cached.digest, store):
                return refused
            return self._serve(flow, route, cached)
        if holds_local_token(flow):
            # The token host's failure was reported when the token was issued: not again per tag.
            return await self._serve_stale(flow, route, cached, "no token from the registry's token service", logging.DEBUG)
        return await self._revalidate(flow, route, cached)

    async def referrers(self, flow: http.HTTPFlow, route: Route) -> Decision:
        """The manifests that name `route.reference` as their subject: upstream's list, else the
        cache's."""
        store = self.folder.open_store()
        reason = "offline" if ctx.options.offline else "no token from the registry's token service"
        if not ctx.options.offline and not holds_local_token(flow):
            try:
                request = upstream.request_for(flow, route, flow.request.method)
                answer = upstream.available(await self.upstream.send(flow, request, ctx.options.revalidate_timeout))
            except upstream.UpstreamError as e:
                reason = str(e)
            else:
                if answer.status_code == 200 and (listed := _listed(answer.content or b"")) is not None:
                    await self.folder.note(store.add_referrers, route.registry, route.name, route.reference, listed)
                return Relay(answer)  # a 404: the registry has no referrers API (clients use tags)
        known = await asyncio.to_thread(store.referrers, route.registry, route.name, route.reference)
        if known is None:
            message = f"{route.registry}/{route.name}: no referrers of {route.reference} in the cache ({reason})"
            return RegistryError(ErrorCode.MANIFEST_UNKNOWN, message)
        if refused := await self.access.refusal(flow, route, route.reference, store):
            return refused
        wanted = route.artifact_type
        listed = [d for d in known if not wanted or d.get("artifactType") == wanted]
        body = protocol.referrers_index(listed)
        headers = {**protocol.API_VERSION_HEADERS, "Content-Type": protocol.OCI_INDEX, "Content-Length": str(len(body))}
        if wanted:
            headers["OCI-Filters-Applied"] = "artifactType"
        self.metrics.hit("referrers")
        logger.log(circuits.level(reason, logging.INFO), f"{route.registry}/{route.name}: referrers of {route.reference} from the cache ({reason})")
        return Serve(200, body, headers)

    async def _revalidate(self, flow: http.HTTPFlow, route: Route, cached: Manifest) -> Decision:
        """Ask upstream (HEAD) what the tag names now."""
        store = self.folder.open_store()
        try:
            answer = upstream.available(await self.upstream.send(flow, upstream.request_for(flow, route, "HEAD"), ctx.options.revalidate_timeout))
        except upstream.UpstreamError as e:
            return await self._serve_stale(flow, route, cached, str(e))
        current = answer.headers.get("docker-content-digest") if answer.status_code == 200 else None
        # Upstream answered the client's Accept: what it says is for that kind of client.
        set_tag = functools.partial(store.set_tag, kind=tag_kind(flow))
        if current == cached.digest:
            await self.folder.note(set_tag, route.registry, route.name, route.reference, cached.digest)
            return self._serve(flow, route, cached)
        if current and protocol.DIGEST_RE.fullmatch(current):
            moved = await asyncio.to_thread(store.get_manifest, current)
            if moved and protocol.accepts(flow.request.headers.get_all("accept"), moved.media_type):
                await self.folder.note(set_tag, route.registry, route.name, route.reference, current)
                return self._serve(flow, route, moved)
        # The tag moved to a manifest we lack, or upstream refused (401/403/404): the client's own
        # request goes upstream and gets upstream's answer.
        return await self._ask(flow, route, stale=cached)

    async def _ask(self, flow: http.HTTPFlow, route: Route, stale: Manifest | None = None) -> Decision:
        """Upstream's answer to the client's request, verified and stored (`_finish`). With `stale`
        (the tag's cached manifest), that is served when upstream fails."""
        try:
            decision = await self.misses.ask(flow, route, stale_ok=stale is not None)
        except upstream.UpstreamError as e:
            assert stale
            return await self._serve_stale(flow, route, stale, str(e))
        if isinstance(decision, Relay):
            return await self._finish(flow, route, decision.response, stale)
        return decision

    def _serve(self, flow: http.HTTPFlow, route: Route, manifest: Manifest) -> Serve:
        """Answer from the store: a hit."""
        served = answers.manifest(manifest, flow.request.method)
        size = len(served.body)
        self.metrics.hit("manifest")
        if flow.request.method == "GET" and not flow.metadata.get(Mark.WATCH):
            self.metrics.pulls_saved.labels(route.registry).inc()
        self.metrics.sent(Source.CACHE, size)
        self.pulls.manifest(flow, route, Source.CACHE, size)
        return served

    async def _serve_stale(self, flow: http.HTTPFlow, route: Route, cached: Manifest, reason: str, level: int | None = None) -> Decision:
        store = self.folder.open_store()
        if refused := await self.access.refusal(flow, route, cached.digest, store):
            return refused
        logger.log(level or circuits.level(reason), f"{route.image}: {reason}; serving the cached {cached.digest}")
        served = self._serve(flow, route, cached)
        await self.folder.journal_miss(route, Outcome.STALE, reason, digest=cached.digest)
        return served

    async def _from_fleet(self, route: Route, digest: str) -> Manifest | None:
        """A manifest another node fetched (verified again on the way), kept in the local tier.
        Serving it still needs the client's access confirmed (Access.refusal)."""
        store = self.folder.open_store()
        manifest = await self.fleet.get_manifest(digest)
        if manifest is not None:
            await self.folder.note(store.put_manifest, manifest.digest, manifest.media_type, manifest.body)
            await self.folder.journal_miss(route, Outcome.FILLED, "from the shared store", digest=digest, size=len(manifest.body))
        return manifest

    async def _tag_from_fleet(self, route: Route) -> TagEntry | None:
        """A tag another node learned, kept in the local tier as it was confirmed there: it is
        revalidated like a tag this node learned, which costs upstream a HEAD instead of a GET,
        and when upstream is unreachable (or hubcache offline) it is what the tag resolves to."""
        store = self.folder.open_store()
        shared = await self.fleet.get_tag(route.registry, route.name, route.reference)
        if shared is None:
            return None
        if not await asyncio.to_thread(store.get_manifest, shared.digest):
            if not await self._from_fleet(route, shared.digest):
                return None
        await self.folder.note(store.set_tag, route.registry, route.name, route.reference, shared.digest, shared.confirmed)
        return TagEntry(shared.digest, shared.confirmed)

    # upstream's answer

    async def _finish(self, flow: http.HTTPFlow, route: Route, response: http.Response, stale: Manifest | None) -> Decision:
        """Upstream answered the client's request: verify and store a manifest, learn a tag. With
        `stale`, a tag's cached manifest is served if upstream cannot serve now (5xx, 429)."""
        try:
            response = await self._follow_redirects(flow, response)
        except upstream.Unfollowable as e:
            logger.warning(f"{route.image}: {e}")
            await self.folder.journal_miss(route, Outcome.REJECTED, str(e))
            return RegistryError(ErrorCode.UPSTREAM_FAILED, f"{route.image}: {e}")
        store = self.folder.open_store()
        if stale:
            try:
                upstream.available(response)
            except upstream.Unavailable as e:
                return await self._serve_stale(flow, route, stale, str(e))
        claimed = route.reference if route.by_digest else response.headers.get("docker-content-digest", "")
        kind = tag_kind(flow)
        if flow.request.method == "HEAD" and response.status_code == 200 and not route.by_digest:
            # dockerd resolves a tag with HEAD and then GETs by digest: learn the tag here. The
            # manifest is verified when it is fetched; until then the tag counts as uncached.
            if protocol.DIGEST_RE.fullmatch(claimed):
                try:
                    await asyncio.to_thread(store.set_tag, route.registry, route.name, route.reference, claimed, kind=kind)
                except OSError as e:
                    logger.warning(f"{route.image}: tag not cached: {e.strerror or e}")
        if response.status_code == 200:
            self.pulls.manifest(flow, route, Source.UPSTREAM, len(response.raw_content or b""))
        if response.status_code == 404:
            self.misses.note_absent(flow, route)
        if flow.request.method != "GET" or response.status_code != 200 or response.raw_content is None:
            if response.status_code != 401:
                await self.folder.journal_miss(route, Outcome.PASSED, f"upstream answered {response.status_code}")
            return Relay(response)
        body = response.content or b""
        algorithm = route.reference.partition(":")[0] if route.by_digest else "sha256"
        digest = protocol.digest_of(body, algorithm)
        if claimed and claimed.startswith(f"{algorithm}:") and claimed != digest:
            logger.warning(f"{route.image}: upstream manifest hashes to {digest}, not {claimed}")
            await self.folder.journal_miss(route, Outcome.REJECTED, "digest mismatch", digest=digest, size=len(body))
            return RegistryError(ErrorCode.UPSTREAM_MANIFEST_INVALID, f"upstream sent a manifest that does not match {claimed}")
        media_type = protocol.manifest_media_type(body, response.headers.get("content-type", ""))
        try:
            await asyncio.to_thread(store.put_manifest, digest, media_type, body)
            await asyncio.to_thread(store.link, route.registry, route.name, digest)
            if not route.by_digest:
                await asyncio.to_thread(store.set_tag, route.registry, route.name, route.reference, digest, kind=kind)
        except OSError as e:
            logger.warning(f"{route.image}: served but not cached: {e.strerror or e}")
            await self.folder.journal_miss(route, Outcome.PASSED, f"not stored: {e.strerror or e}", digest=digest)
            return Relay(response)
        if referrer := manifests.referrer(digest, media_type, body):
            subject, entry = referrer
            await self.folder.note(store.add_referrers, route.registry, route.name, subject, [entry])
        await self.folder.journal_miss(route, Outcome.FILLED, None, digest=digest, size=len(body))
        # The shared store keeps what tags name: a tag learned for a client that takes no index stays here.
        tag = None if route.by_digest or kind is not TagKind.INDEX else (route.registry, route.name, route.reference)
        self.fleet.publish_manifest(digest, media_type, body, tag)
        await self.access.learn(flow, route, store)
        return Relay(response)

    async def _follow_redirects(self, flow: http.HTTPFlow, response: http.Response) -> http.Response:
        """Some registries (registry.k8s.io) redirect manifest requests to another host: follow
        them here, so the manifest is cached under the registry's name. If the other host refuses
        hubcache (it gets no credentials), the client gets the redirect and follows it itself. A
        redirect that renames what was asked, or goes to no URL, raises upstream.Unfollowable. Returns
        the last answer."""
        request = flow.request
        for _ in range(upstream.MAX_REDIRECTS):
            location = response.headers.get("location")
            if response.status_code not in protocol.REDIRECTS or not location:
                return response
            request = upstream.redirected(request, location)
            if request.scheme != "https":
                return response  # a manifest from plain HTTP is evidence of nothing: the client decides
            try:
                answer = await self.upstream.run(upstream.subrequest(flow, request), ctx.options.fill_timeout)
            except upstream.UpstreamError:
                return response
            if answer.status_code in (401, 403):
                return response
            response = answer
        return response


def tag_kind(flow: http.HTTPFlow) -> TagKind:
    """Which of a tag's entries the client's request reads first and teaches."""
    return TagKind.INDEX if protocol.takes_indexes(flow.request.headers.get_all("accept")) else TagKind.SINGLE


def _cached_tag(store: Store, route: Route, accept: list[str]) -> tuple[TagEntry | None, Manifest | None]:
    """The tag's entry for a client with this `Accept` and its manifest, if the store holds one the
    client takes: the entry of the client's own kind; for a client that takes no index, else what
    the tag names when the client takes that (upstream gives it to every client that does)."""
    kinds = [TagKind.INDEX] if protocol.takes_indexes(accept) else [TagKind.SINGLE, TagKind.INDEX]
    for kind in kinds:
        entry = store.get_tag(route.registry, route.name, route.reference, kind)
        manifest = store.get_manifest(entry.digest) if entry else None
        if entry and manifest and protocol.accepts(accept, manifest.media_type):
            return entry, manifest
    return None, None


def _listed(body: bytes) -> list[dict] | None:
    """The descriptors of a referrers answer (an OCI index), each with a digest; None if it is not one."""
    try:
        document = protocol.parse_json(body)
    except ValueError:
        return None
    entries = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and protocol.DIGEST_RE.fullmatch(str(e.get("digest"))) for e in entries):
        return None
    return entries
