"""The status listener (option `status_listen`), apart from the proxy port: Prometheus metrics at
/metrics, and a status page for people at / that draws itself from /status.json. Images of
repositories not known to be public are shown as "(private)" unless `status_private` is on."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import asdict
from importlib import resources
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from prometheus_client import make_wsgi_app
from prometheus_client.registry import Collector

from ..blobserver.host import LOOPBACK_HOSTS
from ..blobserver.listeners import BoundedHead, BoundedThreads
from ..registry.protocol import ImageReference
from ..storage.folder import CacheFolder
from ..storage.store import Summary
from ..units import decimal
from .metrics import Metrics
from .pull_log import PullLog

logger = logging.getLogger(__name__)

REFRESH = 10  # seconds between looks at the store (its size) and points of the hit ratio history
RECENT_MISSES = 20
JOURNAL_TAIL = 64 * 1024  # bytes of the miss journal read for the recent misses
PRIVATE = "(private)"


class _Server(BoundedThreads, WSGIServer):
    max_connections = 16
    head_timeout = 10.0  # seconds for a request head, however slowly it trickles in


class _NetworkServer(_Server):
    """On an address beyond this machine's names for itself: one client address holds a quarter of
    the connections at most, so a client's silent connections leave a scraper the rest. (On
    loopback every client has one address: a share there would only refuse a browser's.)"""

    max_per_address = _Server.max_connections // 4


class _QuietHandler(BoundedHead, WSGIRequestHandler):
    server: _Server

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if parsed and self.server.deadlines and (watched := self.server.deadlines.current()):
            watched.expect(None, "")  # the head is in: the answer is small, and the connection ends with it
        return parsed

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("status page: " + format % args)


class WatchState(Protocol):
    """What the page shows of the watch (prefetch/watch.py, a layer above this one)."""

    def snapshot(self) -> list[dict]: ...


class StatusPage:
    def __init__(self, folder: CacheFolder, metrics: Metrics, pulls: PullLog, watch: WatchState):
        self.folder = folder
        self.watch = watch
        self.metrics = metrics
        self.pulls = pulls
        self.summary = Summary()
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._page = resources.files(__package__).joinpath("status.html").read_bytes()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "status_listen",
            str,
            "127.0.0.1:3129",
            "ADDRESS:PORT of the status page (/) and the Prometheus metrics (/metrics); "
            "empty: neither is served.",
        )
        loader.add_option(
            "status_private",
            bool,
            False,
            "Show images of private repositories (and those whose visibility is not known yet) on "
            "the status page by name; off, they are shown as (private).",
        )

    def configure(self, updated: set[str]) -> None:
        if "status_listen" in updated:
            if ctx.options.status_listen and _address(ctx.options.status_listen) is None:
                raise exceptions.OptionsError(
                    f"status_listen: {ctx.options.status_listen!r} is not ADDRESS:PORT (e.g. 127.0.0.1:3129)"
                )
            if self._task:  # running: move now
                self._listen()
        if "client_idle_timeout" in updated and self._server:
            self._server.idle_timeout = ctx.options.client_idle_timeout

    def ports(self) -> list[int]:
        """The listener's port (for `Destinations`: never reachable through the proxy)."""
        return [self._server.server_address[1]] if self._server else []

    def running(self) -> None:
        self._listen()
        self._task = asyncio.create_task(self._refresh_periodically())

    def done(self) -> None:
        if self._task:
            self._task.cancel()
        self._close()

    def _listen(self) -> None:
        self._close()
        address = _address(ctx.options.status_listen)
        if address is None:
            return
        try:
            server_class = _Server if address[0] in LOOPBACK_HOSTS else _NetworkServer
            self._server = make_server(*address, self._app, server_class=server_class, handler_class=_QuietHandler)
            self._server.idle_timeout = ctx.options.client_idle_timeout
        except OSError as e:
            logger.error(f"hubcache: no status page on {ctx.options.status_listen}: {e.strerror or e}")
            return
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # server_bind() set it from getsockname(); typeshed also allows the bytes __init__ takes
        logger.info(f"hubcache: status page on http://{host}:{port}/ (metrics at /metrics)")

    def _close(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    async def _refresh_periodically(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH)

    async def refresh(self) -> None:
        self.metrics.sample()
        if store := self.folder.store:
            try:
                self.summary = await asyncio.to_thread(store.summary)
            except (OSError, sqlite3.Error) as e:  # a busy or broken index: the figures wait
                logger.warning(f"hubcache: store figures not read: {getattr(e, 'strerror', None) or e}")
                return
            self.metrics.store_summary(self.summary)

    # The web application (runs in the server's threads)

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/status.json":
            body, content_type = json.dumps(self.status()).encode(), "application/json"
        elif path in ("/", "/index.html"):
            body, content_type = self._page, "text/html; charset=utf-8"
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the status page is at /, the metrics at /metrics\n"]
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]

    def status(self) -> dict:
        """Everything the page shows."""
        hits, misses = self.metrics.totals()
        recent, popular = self.pulls.snapshot()
        served = _values(self.metrics.served, "source")
        ratelimits = _values(self.metrics.ratelimit_remaining, "host")
        up = {host: bool(value) for host, value in _values(self.metrics.upstream_up, "host").items()}
        longest_lag, stalls = self.metrics.stalls()
        saved = {ImageReference(registry, "", "").host: n for registry, n in _values(self.metrics.pulls_saved, "registry").items()}
        return {
            "store": asdict(self.summary),
            "requests": {"hits": hits, "misses": misses, "hit_ratio": hits / (hits + misses) if hits + misses else None},
            "served": {source: served.get(source, 0) for source in ("cache", "shared", "upstream")},
            "fills_in_progress": _values(self.metrics.fills).get("", 0),
            "event_loop": {"longest_lag": longest_lag, "stalls": stalls},
            "history": self.metrics.hit_ratio_history(),
            "top_images": [{"image": self._image(image), "pulls": count} for image, count in popular],
            "recent_pulls": [
                {
                    "image": self._image(p.image),
                    "client": p.client,
                    "started": p.started,
                    "blobs": p.blobs,
                    "from_cache": p.from_cache,
                    "from_shared": p.from_shared,
                    "from_upstream": p.from_upstream,
                    "seconds": round(p.duration, 3),
                }
                for p in recent
            ],
            "recent_misses": self._recent_misses(),
            "watch": self.watch.snapshot(),
            "watch_served_first": sum(_values(self.metrics.watch_served_first, "registry").values()),
            "upstream": [
                {"host": host, **asdict(health), "up": up.get(host), "ratelimit_remaining": ratelimits.get(host), "pulls_saved": saved.get(host, 0)}
                for host, health in sorted(self.metrics.upstream_health().items())
            ],
        }

    def _recent_misses(self) -> list[dict]:
        journal = self.folder.journal
        if journal is None:
            return []
        lines = journal.tail(JOURNAL_TAIL)
        entries = []
        for line in lines[-RECENT_MISSES:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn line
            if not self._shown(entry.get("registry", ""), entry.get("repository", "")):
                entry.update(repository=PRIVATE, reference="", digest=None)
            entries.append(entry)
        return list(reversed(entries))

    def _image(self, image: str) -> str:
        try:
            reference = ImageReference.parse(image)
        except ValueError:
            return PRIVATE
        return image if self._shown(reference.registry, reference.repository) else PRIVATE

    def _shown(self, registry: str, repository: str) -> bool:
        """Whether the page may name this repository: it is known to be public, or the operator
        chose to show every repository."""
        if ctx.options.status_private:
            return True
        store = self.folder.store
        try:
            return store is not None and store.visibility(registry, repository) is True
        except (OSError, sqlite3.Error):
            return False


def _values(metric: Collector, label: str = "") -> dict[str, float]:
    """A metric's current values by one label's value (counters: their totals)."""
    return {s.labels.get(label, ""): s.value for m in metric.collect() for s in m.samples}


def _address(text: str) -> tuple[str, int] | None:
    host, colon, port = text.rpartition(":")
    number = decimal(port)
    if not (colon and host) or number is None or number >= 65536:
        return None
    return host.strip("[]"), number
