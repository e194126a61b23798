"""Private images stay private: cached content is served only to clients upstream would serve it to.

Per repository, whether it is public (an anonymous probe) and which digests belong to it; anything
but a known digest of a public repository is checked upstream with the client's own credentials.
docs/security.md ("Private images") has the rules."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from ..mitm.answers import RegistryError
from ..mitm.flows import Mark
from ..registry import protocol
from ..registry.protocol import ErrorCode, Kind, Route
from ..storage.store import Store
from ..upstream import circuits
from ..upstream import client as upstream

logger = logging.getLogger(__name__)

MAX_ALLOWED = 10_000  # upstream's yeses remembered at once (per token and repository)


class Access:
    def __init__(self, out: upstream.Upstream | None = None) -> None:
        self.upstream = out or upstream.Upstream()
        # (token hash, registry, repo) -> until, oldest first: bounded, however many tokens clients try
        self._allowed: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "access_check_seconds",
            int,
            60,
            "Seconds upstream's yes to a client's credentials for a private repository is remembered "
            "(per token and repository) before cached content is checked again.",
        )
        loader.add_option(
            "offline_private",
            bool,
            False,
            "Offline, also serve content of private repositories (no credentials can be checked "
            "without upstream): only for a site where every client may pull everything cached.",
        )
        loader.add_option(
            "visibility_check_seconds",
            int,
            3600,
            "Seconds a repository's visibility (public or private) is trusted before an anonymous "
            "probe asks upstream again, so a repository made private stops being served to anyone.",
        )

    def configure(self, updated: set[str]) -> None:
        for name in ("access_check_seconds", "visibility_check_seconds"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name} must be 0 or more seconds")

    async def refusal(self, flow: http.HTTPFlow, route: Route, digest: str, store: Store) -> RegistryError | None:
        """None if the client may have `digest` of `route`'s repository from the cache, else the
        registry error it gets instead. A tag's digest counts as known in its repository."""
        public, checked, known = await asyncio.to_thread(_what_the_cache_knows, store, route, digest)
        if ctx.options.offline:
            if known and (public is True or ctx.options.offline_private):
                return None
            if known and public is None and await asyncio.to_thread(store.imported, route.registry, route.name):
                return None  # imported from a bundle that did not say: the operator chose to serve it
            why = "was never pulled through this repository" if not known else "may be private" if public is None else "is private"
            return RegistryError(ErrorCode.UNAUTHORIZED, f"{route.image} {why}; offline, hubcache cannot check credentials")
        if holds_local_token(flow):
            # hubcache issued this token while the token host was down: upstream cannot be asked.
            if known and public is True:
                return None
            return RegistryError(ErrorCode.UNAVAILABLE, f"{route.image}: the registry's token service is down, so access cannot be checked")
        if known and public is True and time.time() - (checked or 0) >= ctx.options.visibility_check_seconds:
            # Probed with what the repository is known to hold: a digest it does not hold would
            # get a 404 that says nothing of the repository, and make it private for everyone.
            public = await self.probe(flow, route, store) is not False  # unknown: as last seen
        key = (token_key(flow), route.registry, route.name)
        if known and (public is True or self._allowed.get(key, 0.0) > time.monotonic()):
            return None
        try:
            request = upstream.request_for(flow, route, "HEAD")
            answer = upstream.available(await self.upstream.send(flow, request, ctx.options.revalidate_timeout, follow=True))
        except upstream.UpstreamError as e:
            reason = str(e)
            if known and public is True:
                logger.log(circuits.level(reason), f"{route.image}: access not confirmed ({reason}); served, as the repository is public")
                return None
            logger.warning(f"{route.image}: access not confirmed ({reason}); not served")
            return RegistryError(ErrorCode.UNAVAILABLE, f"{route.image}: upstream cannot confirm access ({reason})")
        if answer.status_code != 200:
            logger.info(f"{route.image}: upstream refused this client ({answer.status_code}); not served")
            unknown = ErrorCode.BLOB_UNKNOWN if route.kind is Kind.BLOB else ErrorCode.MANIFEST_UNKNOWN
            codes = {401: ErrorCode.UNAUTHORIZED, 404: unknown}  # 429 and 5xx: upstream.available raised
            challenge = answer.headers.get("www-authenticate")
            return RegistryError(
                codes.get(answer.status_code, ErrorCode.DENIED),
                f"{route.image}: upstream refused these credentials",
                {"WWW-Authenticate": challenge} if challenge else {},
            )
        self._allow(key)
        try:
            await asyncio.to_thread(store.link, route.registry, route.name, digest)
        except OSError as e:
            logger.warning(f"hubcache: not noted in the cache: {e.strerror or e}")
        return None

    def _allow(self, key: tuple[str, str, str]) -> None:
        """Remember upstream's yes for `access_check_seconds`; what expired is forgotten, and the
        oldest yes once MAX_ALLOWED are remembered."""
        now = time.monotonic()
        self._allowed.pop(key, None)
        self._allowed[key] = now + ctx.options.access_check_seconds
        while self._allowed:
            oldest, until = next(iter(self._allowed.items()))
            if until > now and len(self._allowed) <= MAX_ALLOWED:
                break
            del self._allowed[oldest]

    async def learn(self, flow: http.HTTPFlow, route: Route, store: Store) -> None:
        """After a manifest was cached: probe whether an anonymous client may pull it, unless
        known recently. `route` is the request that cached it; the probe repeats it as a HEAD."""
        checked = await asyncio.to_thread(store.visibility_checked, route.registry, route.name)
        if checked and time.time() - checked < ctx.options.visibility_check_seconds:
            return
        await self.probe(flow, route, store)

    async def probe(self, flow: http.HTTPFlow, route: Route, store: Store) -> bool | None:
        """Ask upstream whether the repository is public and note the answer; None if upstream
        could not tell."""
        public = await self._anonymous_head(flow, route)
        if public is not None:
            logger.info(f"hubcache: {route.registry}/{route.name} is {'public' if public else 'private'}")
            try:
                await asyncio.to_thread(store.set_visibility, route.registry, route.name, public)
            except OSError as e:
                logger.warning(f"hubcache: not noted in the cache: {e.strerror or e}")
        return public

    async def _anonymous_head(self, like: http.HTTPFlow, route: Route) -> bool | None:
        """Whether upstream answers the request without credentials (an anonymous token is fine);
        None if it could not tell."""
        timeout = ctx.options.revalidate_timeout
        request = upstream.request_for(like, route, "HEAD")
        request.headers.pop("authorization", None)
        try:
            answer = upstream.available(await self.upstream.run(upstream.subrequest(like, request), timeout))
            if answer.status_code != 401:
                return _lets_pull(answer.status_code)
            token = await self._anonymous_token(like, answer.headers.get("www-authenticate", ""), route.name, timeout)
            if token is None:
                return False
            request = request.copy()
            request.headers["authorization"] = f"Bearer {token}"
            answer = upstream.available(await self.upstream.run(upstream.subrequest(like, request), timeout))
        except upstream.UpstreamError:
            return None
        return _lets_pull(answer.status_code)

    async def _anonymous_token(self, like: http.HTTPFlow, challenge: str, name: str, timeout: float) -> str | None:
        url = protocol.token_request(challenge, name)
        if url is None:
            return None
        request = http.Request.make("GET", url)
        request.host_header = request.pretty_host  # an HTTP/1.1 request names its host
        try:
            answer = await self.upstream.run(upstream.subrequest(like, request), timeout)
        except upstream.UpstreamError:
            return None
        return protocol.token_of(answer.content or b"") if answer.status_code == 200 else None


def _lets_pull(status: int) -> bool:
    """Whether an answer lets its client pull: a 200, or a redirect (a registry sends to its blob
    host only a request it allowed)."""
    return status == 200 or status in protocol.REDIRECTS


def _what_the_cache_knows(store: Store, route: Route, digest: str) -> tuple[bool | None, float | None, bool]:
    """The repository's visibility, when it was probed, and whether `digest` is known in it (one
    trip to a thread)."""
    known = not route.by_digest or store.linked(route.registry, route.name, digest)
    return store.visibility(route.registry, route.name), store.visibility_checked(route.registry, route.name), known


def holds_local_token(flow: http.HTTPFlow) -> bool:
    """The client holds a token hubcache issued because the token host could not, and that host is
    still down (checked by the cache, cache/local_tokens.py)."""
    return bool(flow.metadata.get(Mark.LOCAL_TOKEN))


def token_key(flow: http.HTTPFlow) -> str:
    """The client's credentials, hashed: tokens are never kept."""
    return hashlib.sha256(flow.request.headers.get("authorization", "").encode()).hexdigest()
