"""Which images may be pulled through hubcache: options `deny_images` and `allow_images` (glob
patterns over `registry/repository[:tag]`); a refused pull gets a registry `403 DENIED` naming the
rule, on every way in."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from fnmatch import fnmatchcase

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from ..mitm import answers
from ..mitm.flows import is_subrequest
from ..observe.metrics import Metrics
from ..proxy.routes import route_of
from ..registry.protocol import ErrorCode, Kind, Route
from ..storage.folder import CacheFolder
from ..storage.journal import Outcome

logger = logging.getLogger(__name__)

_PATTERN = re.compile(r"[A-Za-z0-9._\-/:*?\[\]!]+")


class ImagePolicy:
    def __init__(self, folder: CacheFolder, metrics: Metrics):
        self.folder = folder
        self.metrics = metrics

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "deny_images",
            Sequence[str],
            [],
            "Glob patterns over registry/repository[:tag] (e.g. docker.io/library/*, *:latest) that "
            "hubcache refuses to serve or fetch, with a registry 403 naming the rule.",
        )
        loader.add_option(
            "allow_images",
            Sequence[str],
            [],
            "When set, only images matching one of these glob patterns over registry/repository[:tag] "
            "are served or fetched; deny_images still wins.",
        )

    def configure(self, updated: set[str]) -> None:
        for name in ("deny_images", "allow_images"):
            if name in updated:
                for pattern in getattr(ctx.options, name):
                    # registry/repository..., or a pattern that starts with a wildcard (*:latest)
                    if not _PATTERN.fullmatch(pattern) or not ("/" in pattern or pattern.startswith("*")):
                        raise exceptions.OptionsError(
                            f"{name}: {pattern!r} is not a pattern over registry/repository[:tag] (e.g. docker.io/library/*)"
                        )

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or is_subrequest(flow):
            return
        if (route := route_of(flow)) is None:
            return
        if route.kind not in (Kind.MANIFEST, Kind.BLOB, Kind.REFERRERS) or (rule := self.refusal(route)) is None:
            return
        logger.info(f"{route.image}: refused by {rule}")
        answers.error(flow, ErrorCode.DENIED, f"{route.image} is refused by {rule}")
        self.metrics.denied.labels(rule).inc()
        await self.folder.journal_miss(route, Outcome.DENIED, rule)

    @staticmethod
    def refusal(route: Route) -> str | None:
        """The rule that refuses `route`, as an operator reads it, or None."""
        for pattern in ctx.options.deny_images:
            if _matches(pattern, route, tagless=False):
                return f"deny_images rule {pattern!r}"
        allowed = ctx.options.allow_images
        if allowed and not any(_matches(pattern, route, tagless=True) for pattern in allowed):
            return "allow_images (no rule names it)"
        return None


def _matches(pattern: str, route: Route, tagless: bool) -> bool:
    """Whether `pattern` covers `route`. A tag pattern and a request without a tag (a digest, a
    blob): `tagless` says what to answer."""
    repository, colon, tag = pattern.rpartition(":") if ":" in pattern.rpartition("/")[2] else (pattern, "", "")
    if not fnmatchcase(f"{route.registry}/{route.name}", repository):
        return False
    if not colon:
        return True
    if route.kind is Kind.MANIFEST and not route.by_digest:
        return fnmatchcase(route.reference, tag)
    return tagless
