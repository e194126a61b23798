"""Options that several of hubcache's addons read, declared once here. An option only one addon
reads is declared by that addon."""

from __future__ import annotations

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader


class CommonOptions:
    def load(self, loader: Loader) -> None:
        loader.add_option(
            "offline",
            bool,
            False,
            "Never connect upstream: answer /v2/ and token requests locally, resolve tags to the "
            "last digest seen, serve manifests and blobs from the store, and answer anything "
            "missing at once with a registry 404 that says it is not in the offline cache.",
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
            "fill_timeout",
            int,
            60,
            "Seconds upstream may stay silent while hubcache fetches a blob (before answering, or "
            "in the middle of the body) before the fetch is abandoned.",
        )
        loader.add_option(
            "client_idle_timeout",
            int,
            60,
            "Seconds a connection to the blob server or the status page may stay idle (sending or "
            "reading nothing) before it is closed.",
        )

    def configure(self, updated: set[str]) -> None:
        for name in ("tag_freshness", "revalidate_timeout"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name} must be 0 or more seconds")
        for name in ("fill_timeout", "client_idle_timeout"):
            if name in updated and getattr(ctx.options, name) < 1:
                raise exceptions.OptionsError(f"{name} must be 1 or more seconds")
