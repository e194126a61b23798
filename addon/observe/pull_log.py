"""One log line per pull: the image, the bytes from the cache and from upstream, and how long it
took. A pull is followed by client address and repository, from its first manifest request until its
blob transfers ended and `QUIET` seconds passed; the status page's most pulled images come from here
too."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from .. import units
from ..mitm.flows import Mark, Source
from ..mitm.internals import FLOW_LOGGERS
from ..registry.protocol import Kind, Route

logger = logging.getLogger(__name__)


QUIET = 5.0  # seconds without a request or a transfer that end a pull
ABANDONED = 600.0  # a transfer never reported (the client did not follow the URL) stops counting
RECENT = 50  # finished pulls kept for the status page
POPULAR = 1000  # images counted for the most pulled (twice as many before the least pulled go)


@dataclass
class Pull:
    key: tuple[str, str, str]
    client: str
    image: str  # registry/repository:tag, or @digest when pulled by digest
    started: float = field(default_factory=time.time)
    last: float = field(default_factory=time.monotonic)
    begun: float = field(default_factory=time.monotonic)
    transfers: set[str] = field(default_factory=set)  # tags of the blob URLs not reported yet
    blobs: int = 0
    manifests: int = 0  # manifests served (a 200): a pull of an image, not of a name nobody has
    from_cache: int = 0
    from_shared: int = 0  # fleet mode: the shared store
    from_upstream: int = 0

    @property
    def duration(self) -> float:
        return self.last - self.begun

    def line(self) -> str:
        shared = f"{units.size(self.from_shared)} from the shared store, " if self.from_shared else ""
        return (
            f"pull {self.image} by {self.client}: {self.blobs} blobs, {units.size(self.from_cache)} from cache, "
            f"{shared}{units.size(self.from_upstream)} from upstream, {self.duration:.1f}s"
        )


class PullLog:
    def __init__(self) -> None:
        self._pulls: dict[tuple[str, str, str], Pull] = {}  # by client, registry, repository
        self._transfers: dict[str, tuple[Pull, Source]] = {}  # by URL tag: the pull and the source
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the status page reads from its own threads
        self.recent: deque[Pull] = deque(maxlen=RECENT)
        self.popular: Counter[str] = Counter()  # pulls per image served, the most pulled kept
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._flow_lines_set = False
        self._flow_detail_ours = False

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "flow_lines",
            bool,
            False,
            "Log mitmproxy's line per connection and per request too (as mitmdump does); off, the "
            "log holds one line per pull, hubcache's notes, warnings and errors.",
        )

    def configure(self, updated: set[str]) -> None:
        # mitmproxy's first configure names only the options it was given, not flow_lines.
        if "flow_lines" in updated or not self._flow_lines_set:
            self._show_flow_lines()

    def _show_flow_lines(self) -> None:
        self._flow_lines_set = True
        for name in FLOW_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET if ctx.options.flow_lines else logging.WARNING)
        # mitmdump's line per request, unless the user set flow_detail: then it is theirs.
        if "flow_detail" in ctx.options and (self._flow_detail_ours or not ctx.options.has_changed("flow_detail")):
            self._flow_detail_ours = True
            ctx.options.flow_detail = 1 if ctx.options.flow_lines else 0

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._end_quiet_pulls())

    def done(self) -> None:
        if self._task:
            self._task.cancel()
        for pull in list(self._pulls.values()):
            self._finish(pull)

    # What the cache reports

    def manifest(self, flow: http.HTTPFlow, route: Route, source: Source, size: int) -> None:
        """A manifest request, answered from `source` (the cache or upstream)."""
        current = self._pulls.get(self._key(flow, route))
        if current and not route.by_digest and current.blobs and not current.transfers:
            self._finish(current)  # a tag asked for again after whole blobs: the next pull
        pull = self._pull(flow, route)
        pull.manifests += 1
        self._add(pull, source, size)

    def transfer(self, flow: http.HTTPFlow, route: Route, source: Source) -> str:
        """A blob sent to the blob server: the tag its URL carries, reported back with the bytes."""
        pull = self._pull(flow, route)
        tag = source.tag(next(self._ids))
        pull.transfers.add(tag)
        pull.blobs += 1
        self._transfers[tag] = (pull, source)
        return tag

    def blob(self, flow: http.HTTPFlow, route: Route, source: Source, size: int) -> None:
        """A blob the proxy sent itself: relayed from upstream, or a small one from the store."""
        pull = self._pull(flow, route)
        pull.blobs += 1
        self._add(pull, source, size)

    def sent(self, tag: str, size: int) -> None:
        """The blob server finished a transfer (called from its reader thread)."""
        if self._loop:
            try:
                self._loop.call_soon_threadsafe(self._transferred, tag, size)
            except RuntimeError:
                pass  # the loop closed: hubcache is exiting

    def _transferred(self, tag: str, size: int) -> None:
        entry = self._transfers.pop(tag, None)
        if entry is None:
            return  # a URL used twice, or a pull already ended
        pull, source = entry
        pull.transfers.discard(tag)
        self._add(pull, source, size)

    # Pulls

    @staticmethod
    def _key(flow: http.HTTPFlow, route: Route) -> tuple[str, str, str]:
        if flow.metadata.get(Mark.WATCH):
            client = "watch"
        else:
            client = flow.client_conn.peername[0] if flow.client_conn.peername else "?"
        return client, route.registry, route.name

    def _pull(self, flow: http.HTTPFlow, route: Route) -> Pull:
        key = self._key(flow, route)
        client = key[0]
        pull = self._pulls.get(key)
        if pull is None:
            image = f"{route.registry}/{route.name}"
            if route.kind is Kind.MANIFEST:
                image += f"{'@' if route.by_digest else ':'}{route.reference}"
            pull = self._pulls[key] = Pull(key, client, image)
        pull.last = time.monotonic()
        return pull

    @staticmethod
    def _add(pull: Pull, source: Source, size: int) -> None:
        if source is Source.CACHE:
            pull.from_cache += size
        elif source is Source.SHARED:
            pull.from_shared += size
        else:
            pull.from_upstream += size
        pull.last = time.monotonic()

    async def _end_quiet_pulls(self) -> None:
        while True:
            await asyncio.sleep(1)
            now = time.monotonic()
            for pull in list(self._pulls.values()):
                idle = now - pull.last
                if (not pull.transfers and idle > QUIET) or idle > ABANDONED:
                    self._finish(pull)

    def _finish(self, pull: Pull) -> None:
        if self._pulls.get(pull.key) is pull:
            del self._pulls[pull.key]
        for tag in pull.transfers:
            self._transfers.pop(tag, None)
        logger.info(pull.line())
        with self._lock:
            self.recent.append(pull)
            if pull.manifests:
                self.popular[pull.image] += 1
                if len(self.popular) > 2 * POPULAR:
                    self.popular = Counter(dict(self.popular.most_common(POPULAR)))

    def snapshot(self) -> tuple[list[Pull], list[tuple[str, int]]]:
        """The recent pulls, newest first, and the most pulled images."""
        with self._lock:
            return list(reversed(self.recent)), self.popular.most_common(10)
