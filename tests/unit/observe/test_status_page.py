"""The status page's data (addon/statuspage.py): which repositories it may name, with taddons."""

from __future__ import annotations

from mitmproxy.test import taddons

from hubcache.fleet.node import Fleet
from hubcache.observe.metrics import Metrics
from hubcache.observe.pull_log import PullLog
from hubcache.observe.status_page import PRIVATE, StatusPage
from hubcache.options import CommonOptions
from hubcache.prefetch.watch import Watch
from hubcache.proxy.interception import Interception
from hubcache.storage.eviction import Upkeep
from hubcache.storage.folder import CacheFolder
from hubcache.storage.journal import Outcome
from hubcache.upstream.circuits import Circuits
from hubcache.upstream.client import Upstream


def test_only_repositories_known_to_be_public_are_named(tmp_path):
    """docs/operating.md: private repositories, and those whose visibility is not known yet, are shown as
    (private) unless status_private is on."""
    hosts = Interception()
    folder = CacheFolder()
    metrics = Metrics(hosts)
    page = StatusPage(folder, metrics, PullLog(), Watch(hosts, folder, Circuits(hosts, metrics), Fleet(), Upkeep(folder), metrics, Upstream()))
    with taddons.context(CommonOptions(), folder, hosts, page) as tctx:
        tctx.options.update(cache_dir=str(tmp_path))
        assert folder.store and folder.journal
        folder.store.set_visibility("docker.io", "library/public", True)
        folder.store.set_visibility("docker.io", "acme/private", False)
        for repository in ("library/public", "acme/private", "acme/unknown"):
            folder.journal.record(registry="docker.io", repository=repository, reference="1", outcome=Outcome.FILLED, kind="manifest")

        def named() -> list[str]:
            return [entry["repository"] for entry in page.status()["recent_misses"]]

        assert named() == [PRIVATE, PRIVATE, "library/public"], "newest first; the unknown one is not named"
        tctx.options.update(status_private=True)
        assert named() == ["acme/unknown", "acme/private", "library/public"]
        folder.done()


def test_the_status_shows_the_event_loop_lag(tmp_path):
    """The longest lag of the event loop since start, and how many lags were over 50 ms."""
    hosts = Interception()
    folder = CacheFolder()
    metrics = Metrics(hosts)
    page = StatusPage(folder, metrics, PullLog(), Watch(hosts, folder, Circuits(hosts, metrics), Fleet(), Upkeep(folder), metrics, Upstream()))
    with taddons.context(CommonOptions(), folder, hosts, page):
        assert page.status()["event_loop"] == {"longest_lag": 0.0, "stalls": 0}
        for lag in (0.2, 0.03, 0.06):
            metrics.loop_lagged(lag)
        assert page.status()["event_loop"] == {"longest_lag": 0.2, "stalls": 2}
