"""What hubcache notes on a flow (`flow.metadata`) for its other addons, and where served bytes
came from. Every key and source is named here, once."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mitmproxy import http


class Mark(StrEnum):
    """Keys of `flow.metadata` that hubcache's addons set and read."""

    SUBREQUEST = "hubcache_subrequest"  # hubcache's own request upstream (upstream.subrequest)
    UNREAD = "hubcache_unread"  # on hubcache's own request: why its answer was not read (too large...)
    MISS = "hubcache_miss"  # on hubcache's own request: what it asks, only upstream can give the client
    FILL = "hubcache_fill"  # on hubcache's own blob request: the digest of the fill it feeds
    ANSWERED = "hubcache_answered"  # hubcache answered the client's request itself
    RELAYED = "hubcache_relayed"  # the client got the answer to hubcache's own request of it
    PASSED = "hubcache_passed"  # on a client's blob request passed upstream: the body bytes relayed
    ROUTE = "hubcache_route"  # on a client's registry request: the Route it was parsed to (proxy/routes.py)
    LOCAL_TOKEN = "hubcache_local_token"  # on a client's registry request: it holds a local token hubcache honours
    WATCH = "hubcache_watch"  # on a request of the watch's own pulls through the proxy (prefetch/watch.py)
    MIRROR = "hubcache_mirror"  # on a mirror request routed to a registry: the mirror's URL as its client dialled it
    NO_BODY = "hubcache_no_body"  # a request hubcache answers itself: a body on it is refused (mitm/bodies.py)


class Source(StrEnum):
    """Where the bytes sent to a client came from (pull log, metrics, blob URL tags)."""

    CACHE = "cache"  # the local store
    UPSTREAM = "upstream"  # the registry, relayed or streamed from a fill
    SHARED = "shared"  # the fleet's shared store

    def tag(self, number: int) -> str:
        """A blob transfer's tag (it travels in the blob URL and comes back with the bytes sent)."""
        return f"{self.value}.{number}"

    @classmethod
    def of_tag(cls, tag: str) -> Source:
        return cls(tag.partition(".")[0])


def is_subrequest(flow: http.HTTPFlow) -> bool:
    """Whether `flow` is hubcache's own request upstream, not a client's."""
    return bool(flow.metadata.get(Mark.SUBREQUEST))
