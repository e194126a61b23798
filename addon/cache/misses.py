"""What the store cannot answer: the client's own request goes upstream, asked by hubcache, and
the caller gets upstream's answer to finish (verify and store a manifest, journal a blob). A 404
that upstream gave the same client lately is answered at once (option `negative_cache_seconds`)."""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from ..mitm.answers import Decision, RegistryError, Relay
from ..mitm.flows import Mark
from ..observe.metrics import Metrics
from ..registry import protocol
from ..registry.protocol import ErrorCode, Kind, Route
from ..storage.folder import CacheFolder
from ..storage.journal import Outcome
from ..upstream import client as upstream
from .access import holds_local_token, token_key

logger = logging.getLogger(__name__)

MAX_ABSENT = 10_000  # 404s remembered at once (see note_absent)


class Misses:
    def __init__(self, folder: CacheFolder, metrics: Metrics, out: upstream.Upstream):
        self.folder = folder
        self.upstream = out
        self.metrics = metrics
        self._absent: dict[tuple[str, str, str, str, str, str], tuple[float, float]] = {}  # -> (until, noted)

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "negative_cache_seconds",
            int,
            10,
            "Seconds an upstream 404 for a tag, manifest or blob is remembered (per client "
            "credentials, and for a manifest per Accept) and answered without asking again; 0 "
            "remembers nothing.",
        )

    def configure(self, updated: set[str]) -> None:
        if "negative_cache_seconds" in updated and ctx.options.negative_cache_seconds < 0:
            raise exceptions.OptionsError("negative_cache_seconds must be 0 or more seconds")

    async def ask(self, flow: http.HTTPFlow, route: Route, stale_ok: bool = False) -> Decision:
        """The store cannot answer: hubcache asks upstream with the client's request, and upstream's
        answer is the decision (Relay), for the caller to finish. If upstream cannot be reached,
        the client gets a registry error (not the proxy's HTML error page), or, with `stale_ok` (a
        tag the cache holds, served instead), the UpstreamError is raised to the caller.
        Offline, with a local token (upstream cannot be asked for it), or after a recent 404 for
        this client, the client is told at once instead."""
        self.metrics.miss(route.kind.value)
        code = ErrorCode.BLOB_UNKNOWN if route.kind is Kind.BLOB else ErrorCode.MANIFEST_UNKNOWN
        if (ago := self.absent_for(flow, route)) is not None:
            await self.folder.journal_miss(route, Outcome.MISSING, "upstream answered 404 lately")
            return RegistryError(code, f"{route.image}: upstream answered 404 {ago:.0f}s ago")
        if ctx.options.offline:
            what = f"blob {route.reference} of {route.registry}/{route.name}" if route.kind is Kind.BLOB else route.image
            await self.folder.journal_miss(route, Outcome.MISSING, "offline")
            return RegistryError(code, f"{what} is not in the offline cache")
        if not stale_ok and holds_local_token(flow):
            await self.folder.journal_miss(route, Outcome.FAILED, "no token from the registry's token service")
            why = "the registry's token service cannot be reached to fetch it"
            return RegistryError(ErrorCode.UNAVAILABLE, f"{route.image} is not cached, and {why}")
        ask = upstream.subrequest(flow, upstream.request_for(flow, route, flow.request.method))
        ask.metadata[Mark.MISS] = not stale_ok  # a tag the cache holds is served instead
        try:
            return Relay(await self.upstream.run(ask, ctx.options.fill_timeout))
        except upstream.Unreadable as e:
            await self.folder.journal_miss(route, Outcome.REJECTED, str(e))
            bad = ErrorCode.UPSTREAM_FAILED if route.kind is Kind.BLOB else ErrorCode.UPSTREAM_MANIFEST_INVALID
            return RegistryError(bad, f"{route.image}: {e}")
        except upstream.UpstreamError as e:
            if stale_ok:
                raise
            await self.folder.journal_miss(route, Outcome.FAILED, str(e))
            return RegistryError(ErrorCode.UPSTREAM_FAILED, f"{route.registry} cannot be reached: {e}")

    # what upstream said is not there (negative caching)

    def note_absent(self, flow: http.HTTPFlow, route: Route) -> None:
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

    def absent_for(self, flow: http.HTTPFlow, route: Route) -> float | None:
        """Seconds since upstream answered 404 to this client for this, if it is remembered."""
        until, noted = self._absent.get(_absent_key(flow, route), (0.0, 0.0))
        now = time.monotonic()
        return now - noted if until > now else None


def _absent_key(flow: http.HTTPFlow, route: Route) -> tuple[str, str, str, str, str, str]:
    # Per client credentials: what one account cannot see, another may. Per Accept for manifests:
    # a registry answers 404 for a manifest of a type the client does not take (an index to a
    # client that names none), which a client taking it must not be told.
    accept = "" if route.kind is Kind.BLOB else protocol.accept_key(flow.request.headers.get_all("accept"))
    return (token_key(flow), route.kind.value, route.registry, route.name, route.reference, accept)
