"""The registry cache's hooks: each registry request's route to the path that answers it (manifests,
tags and referrers to `ManifestRequests`, blobs to `BlobRequests`, the /v2/ check here, with
`RecentPings`), token requests relayed or answered with a local token, and upstream's answers
followed to the response and error hooks (a fill's body reaches its fill directly, through the sink
it gives `Upstream.run`). Each path returns a decision (`answers.Decision`) and `answers.give`
writes it: the one place a client's answer is written. With `offline`, nothing goes upstream."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from ..mitm import answers
from ..mitm.answers import Decision, PassThrough, RegistryError, Relay
from ..mitm.flows import Mark, is_subrequest
from ..proxy.credentials import pull_scopes
from ..proxy.interception import Interception
from ..proxy.routes import route_of
from ..registry import protocol
from ..registry.protocol import ErrorCode, Kind, Route
from ..registry.settings import AUTH_HOSTS
from ..storage.folder import CacheFolder
from ..upstream import circuits
from ..upstream import client as upstream
from .blob_path import BlobRequests
from .local_tokens import LocalTokens
from .manifest_path import ManifestRequests
from .misses import Misses
from .pings import RecentPings

logger = logging.getLogger(__name__)


class RegistryCache:
    def __init__(
        self,
        hosts: Interception,
        folder: CacheFolder,
        misses: Misses,
        manifests: ManifestRequests,
        blobs: BlobRequests,
        out: upstream.Upstream,
        breaker: circuits.Circuits,
    ):
        self.hosts = hosts
        self.upstream = out
        self.breaker = breaker  # which registries and token hosts are down, and their last challenges
        self.folder = folder
        self.misses = misses
        self.manifests = manifests
        self.blobs = blobs
        self.tokens = LocalTokens()
        self.pings = RecentPings()

    def load(self, loader: Loader) -> None:
        # A hit must never wait for (or fail on) an upstream connection.
        if not loader.master.options.has_changed("connection_strategy"):
            loader.master.options.connection_strategy = "lazy"

    # request -> route

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or is_subrequest(flow):
            return
        answers.give(flow, await self._decide(flow))

    async def _decide(self, flow: http.HTTPFlow) -> Decision:
        route = route_of(flow)
        if route is None:
            if self.hosts.registry(flow) is None and (token_host := self.hosts.destination(flow)):
                return await self._token(flow, token_host)
            return PassThrough()
        if self.tokens.honoured(flow.request.headers.get("authorization", ""), flow.request.host):
            flow.metadata[Mark.LOCAL_TOKEN] = True
        if ctx.options.offline and (route.kind is Kind.OTHER or flow.request.method not in ("GET", "HEAD")):
            return RegistryError(ErrorCode.UNSUPPORTED, "hubcache is offline: only pulls are served")
        if flow.request.method not in ("GET", "HEAD"):
            return PassThrough()  # pushes and everything else pass through untouched
        match route.kind:
            case Kind.PING:
                return await self._ping(flow, route)
            case Kind.MANIFEST:
                return await self.manifests.handle(flow, route)
            case Kind.BLOB:
                return await self.blobs.handle(flow, route)
            case Kind.REFERRERS:
                return await self.manifests.referrers(flow, route)
            case Kind.OTHER:
                return PassThrough()  # tag lists, the catalog: upstream's to answer

    async def _ping(self, flow: http.HTTPFlow, route: Route) -> Decision:
        """Relay the version check, but answer it locally when upstream fails: clients ping
        before every pull, and what the cache holds must stay pullable while upstream is down.
        An anonymous check upstream answered moments ago is answered the same (cache/pings.py)."""
        if ctx.options.offline:
            return answers.version_check()
        if recent := self.pings.answer(flow.request):
            return recent
        try:
            request = upstream.request_for(flow, route, flow.request.method)
            answer = upstream.available(await self.upstream.send(flow, request, ctx.options.revalidate_timeout))
            self.pings.learn(request, answer)
            return Relay(answer, counted=False)
        except upstream.UpstreamError as e:
            logger.log(circuits.level(str(e)), f"{route.registry}: {e}; answering /v2/ from the cache")
            if challenge := self.breaker.challenges.get(route.registry):
                # The registry's own challenge: the client asks for a token, which goes upstream
                # as soon as the token host is back (see _token), so its next pull can be cold.
                return RegistryError(ErrorCode.UNAUTHORIZED, "authentication required", {"WWW-Authenticate": challenge})
            return answers.version_check()

    async def _token(self, flow: http.HTTPFlow, host: str) -> Decision:
        """A token request to a registry's token host (Docker Hub's auth.docker.io): relayed by
        hubcache, and answered with a local token when the token host cannot answer (offline,
        down, 5xx, 429, silent past `revalidate_timeout`), so a client can still finish its auth
        flow and pull what the cache may give it without upstream's say: public content."""
        if flow.request.method not in ("GET", "POST"):
            return PassThrough()
        cold = await self._for_uncached(flow, host)
        if not cold and any(self.breaker.down(r) for r in self._served_by(host)):
            # The registry is down: a local token serves all the cache may give for these
            # repositories, and nothing else could be pulled anyway.
            return answers.local_token(self.tokens.issue(host))
        if not ctx.options.offline:
            try:
                request = upstream.token_request_for(flow)
            except protocol.BadRequest as e:
                return RegistryError(e.code, e.message)
            try:
                answer = upstream.available(await self.upstream.send(flow, request, ctx.options.revalidate_timeout, miss=cold))
                self.tokens.answered(host)
                return Relay(answer)
            except upstream.UpstreamError as e:
                logger.log(circuits.level(str(e), logging.INFO), f"{host}: {e}; token answered by hubcache (cached public content only)")
        return answers.local_token(self.tokens.issue(host))

    def _served_by(self, token_host: str) -> list[str]:
        """The registries whose token host `token_host` is."""
        return [r for r, t in AUTH_HOSTS.items() if t == token_host and self.hosts.is_registry(r)]

    async def _for_uncached(self, flow: http.HTTPFlow, host: str) -> bool:
        """Whether a token request names a repository the cache holds nothing of: a local token
        could not pull it, so only the token host can answer."""
        store = self.folder.store
        request = flow.request
        try:  # the same parse the relayed request is rebuilt from (upstream.token_request_for)
            fields = protocol.token_target(request.path)[1]
            if request.method == "POST" and (form := protocol.token_fields(request.get_text(strict=False) or "")):
                fields = form
        except protocol.BadRequest:
            return False  # refused when it is relayed
        scopes = [value for key, value in fields if key == "scope"]
        names = [scope.split(":")[1] for scope in pull_scopes(scopes)]
        registries = {protocol.canonical_registry(r) for r in self._served_by(host)}
        if store is None or not names or not registries:
            return False
        for name in names:
            known = [await asyncio.to_thread(store.visibility, r, name) for r in registries]
            if all(v is None for v in known):
                return True
        return False

    # a blob passed through: its body, and its end

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.blobs.relay(flow)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self.blobs.passed(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self.blobs.passed(flow)
