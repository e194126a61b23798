"""What the cache does, counted: Prometheus metrics (prometheus-client) and the figures of the
status page, from the cache's reports, the blob server's transfers and upstream's answers. Every
counter lives in this addon's own registry, so two proxies in one process never mix figures."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from mitmproxy import http
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from ..mitm.flows import Mark, Source, is_subrequest
from ..proxy.interception import Interception
from ..storage.store import Summary
from ..units import decimal

logger = logging.getLogger(__name__)

HISTORY = 360  # points of the hit ratio history kept (one hour at the status page's interval)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
STALL = 0.05  # a lag over this counts as a stall (one of LAG_BUCKETS; the bound upkeep is held to)


@dataclass
class Sample:
    time: float
    hits: float
    misses: float


@dataclass
class Health:
    """The last thing an upstream host said, and the last time it failed."""

    status: int | None = None
    seen: float | None = None
    error: str | None = None
    failed: float | None = None


class Metrics:
    def __init__(self, hosts: Interception):
        disable_created_metrics()  # no `_created` series beside each counter: nobody reads them
        self.hosts = hosts
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hubcache_requests",
            "Manifest and blob requests, by kind and whether the store answered them (hit) or not (miss).",
            ["kind", "result"],
            registry=r,
        )
        self.served = Counter(
            "hubcache_served_bytes",
            "Bytes sent to clients, by source: the store (cache), upstream (relayed, or streamed "
            "from a fill in progress), or the fleet's shared store (shared).",
            ["source"],
            registry=r,
        )
        self.fetched = Counter("hubcache_upstream_bytes", "Bytes received from upstream.", registry=r)
        self.upstream_requests = Counter(
            "hubcache_upstream_requests",
            "Requests that went upstream, by host and status ('error': no answer).",
            ["host", "status"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "hubcache_upstream_up",
            "1 while a registry or token host answers, 0 while it is down (its circuit is open: "
            "hubcache answers from the cache without waiting for it).",
            ["host"],
            registry=r,
        )
        self.fills = Gauge("hubcache_fills_in_progress", "Blobs being fetched from upstream now.", registry=r)
        self.denied = Counter(
            "hubcache_denied",
            "Manifest and blob requests refused by deny_images or allow_images, by rule.",
            ["rule"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "hubcache_ratelimit_remaining",
            "Pulls left in the registry's rate-limit window (Docker Hub's ratelimit-remaining header).",
            ["host"],
            registry=r,
        )
        self.ratelimit_limit = Gauge(
            "hubcache_ratelimit_limit", "The registry's pull limit per window (ratelimit-limit).", ["host"], registry=r
        )
        self.store_bytes = Gauge("hubcache_store_bytes", "Total size of the blobs in the store.", registry=r)
        self.store_entries = Gauge("hubcache_store_entries", "Entries in the store, by type.", ["type"], registry=r)
        self.watch_checks = Counter(
            "hubcache_watch_checks", "Watched tags checked upstream with a HEAD (watch), by registry.", ["registry"], registry=r
        )
        self.watch_fetched = Counter(
            "hubcache_watch_fetched_bytes", "Bytes the watch fetched from upstream for tags that changed, by registry.", ["registry"], registry=r
        )
        self.watch_success = Gauge(
            "hubcache_watch_last_success_timestamp_seconds",
            "When a watched tag of the registry was last found current or fetched (Unix time).",
            ["registry"],
            registry=r,
        )
        self.watch_served_first = Counter(
            "hubcache_watch_served_first",
            "Pulls (tag requests) answered from the cache with a digest the watch fetched before anyone asked, by registry.",
            ["registry"],
            registry=r,
        )
        self.pulls_saved = Counter(
            "hubcache_upstream_pulls_saved",
            "Manifest GETs of clients answered from the cache: pulls upstream did not count (Docker Hub counts manifest GETs), by registry.",
            ["registry"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "hubcache_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 20 ms: how long a request arriving then "
            "would have waited behind other work on the loop.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge("hubcache_event_loop_lag_max_seconds", "The longest event loop lag since start.", registry=r)
        self.longest_lag = 0.0
        self.history: deque[Sample] = deque(maxlen=HISTORY)
        self.health: dict[str, Health] = {}
        self._lock = threading.Lock()  # the status page reads from its own threads

    # What the cache reports

    def hit(self, kind: str) -> None:
        self.requests.labels(kind, "hit").inc()

    def miss(self, kind: str) -> None:
        self.requests.labels(kind, "miss").inc()

    def sent(self, source: Source, size: int) -> None:
        """Bytes a client received (called from the blob server's reader thread too)."""
        self.served.labels(source).inc(size)

    def sent_by_tag(self, tag: str, size: int) -> None:
        """A transfer the blob server finished; its tag names the source."""
        self.sent(Source.of_tag(tag), size)

    def loop_lagged(self, seconds: float) -> None:
        """How late the event loop ran the lag probe's timer (observe/loop_lag.py)."""
        self.loop_lag.observe(seconds)
        if seconds > self.longest_lag:
            self.longest_lag = seconds
            self.loop_lag_max.set(seconds)

    def stalls(self) -> tuple[float, float]:
        """The longest event loop lag since start, and how many lags were over STALL."""
        within = total = 0.0
        for metric in self.loop_lag.collect():
            for sample in metric.samples:
                if sample.name.endswith("_bucket") and float(sample.labels["le"]) == STALL:
                    within = sample.value
                elif sample.name.endswith("_count"):
                    total = sample.value
        return self.longest_lag, total - within

    def totals(self) -> tuple[float, float]:
        """Hits and misses so far."""
        hits = misses = 0.0
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    if sample.labels["result"] == "hit":
                        hits += sample.value
                    else:
                        misses += sample.value
        return hits, misses

    def sample(self) -> None:
        with self._lock:
            self.history.append(Sample(time.time(), *self.totals()))

    def hit_ratio_history(self) -> list[dict]:
        """The hit ratio of each interval between two samples (None when nothing was asked)."""
        with self._lock:
            samples = list(self.history)
        points = []
        for before, after in itertools.pairwise(samples):
            hits, misses = after.hits - before.hits, after.misses - before.misses
            asked = hits + misses
            points.append({"time": after.time, "requests": asked, "hit_ratio": hits / asked if asked else None})
        return points

    def upstream_health(self) -> dict[str, Health]:
        with self._lock:
            return {host: Health(**vars(h)) for host, h in self.health.items()}

    # Upstream answers

    def response(self, flow: http.HTTPFlow) -> None:
        host = self.hosts.destination(flow)
        if flow.metadata.get(Mark.ANSWERED) or not flow.response or host is None:
            return
        if flow.metadata.get(Mark.RELAYED):  # hubcache's own request counted what came from upstream
            self.served.labels(Source.UPSTREAM).inc(_body_size(flow.response))
            return
        response = flow.response
        self.upstream_requests.labels(host, str(response.status_code)).inc()
        with self._lock:
            health = self.health.setdefault(host, Health())
            health.status, health.seen = response.status_code, time.time()
        for header, gauge in (("ratelimit-remaining", self.ratelimit_remaining), ("ratelimit-limit", self.ratelimit_limit)):
            value = decimal(response.headers.get(header, "").partition(";")[0].strip())
            if value is not None:
                gauge.labels(host).set(value)
        if flow.metadata.get(Mark.FILL):
            return  # hubcache's own blob request: its fill counts the bytes
        size = _body_size(response)
        self.fetched.inc(size)
        if not is_subrequest(flow):  # a client's request: the client got these bytes
            self.served.labels(Source.UPSTREAM).inc(size)

    def error(self, flow: http.HTTPFlow) -> None:
        host = self.hosts.destination(flow)
        if flow.metadata.get(Mark.ANSWERED) or flow.response or host is None:
            return
        self.upstream_requests.labels(host, "error").inc()
        with self._lock:
            health = self.health.setdefault(host, Health())
            health.error, health.failed = flow.error.msg if flow.error else "no answer", time.time()

    def store_summary(self, summary: Summary) -> None:
        self.store_bytes.set(summary.blob_bytes)
        for kind in ("blobs", "manifests", "tags"):
            self.store_entries.labels(kind).set(getattr(summary, kind))


def _body_size(response: http.Response) -> int:
    if response.raw_content is not None:
        return len(response.raw_content)
    return decimal(response.headers.get("content-length", "")) or 0
