"""hubcache's data-path addons wired as `hubcache.addons.make_addons` wires them, for unit tests
with mitmproxy's taddons, around an `Upstream` the test chooses (a fake, usually)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hubcache.blobserver.host import BlobHost
from hubcache.cache.access import Access
from hubcache.cache.blob_path import BlobRequests
from hubcache.cache.fills import Fills
from hubcache.cache.hooks import RegistryCache
from hubcache.cache.manifest_path import ManifestRequests
from hubcache.cache.misses import Misses
from hubcache.fleet.node import Fleet
from hubcache.mitm import internals
from hubcache.observe.metrics import Metrics
from hubcache.observe.pull_log import PullLog
from hubcache.options import CommonOptions
from hubcache.proxy.interception import Interception
from hubcache.proxy.routes import Routes
from hubcache.storage.folder import CacheFolder
from hubcache.upstream.circuits import Circuits
from hubcache.upstream.client import Upstream


@dataclass
class CacheAddons:
    upstream: Upstream = field(default_factory=Upstream)
    hosts: Interception = field(default_factory=Interception)
    blobhost: BlobHost = field(default_factory=lambda: BlobHost(internals.certstore))
    folder: CacheFolder = field(default_factory=CacheFolder)
    pulls: PullLog = field(default_factory=PullLog)
    fleet: Fleet = field(default_factory=Fleet)

    def __post_init__(self) -> None:
        self.options = CommonOptions()
        self.routes = Routes(self.hosts)
        self.access = Access(self.upstream)
        self.metrics = Metrics(self.hosts)
        self.misses = Misses(self.folder, self.metrics, self.upstream)
        self.manifests = ManifestRequests(
            self.hosts, self.folder, self.misses, self.access, self.metrics, self.pulls, self.fleet, self.upstream
        )
        self.fills = Fills(self.folder, self.misses, self.access, self.metrics, self.fleet, self.upstream)
        self.blobs = BlobRequests(self.folder, self.misses, self.blobhost, self.access, self.metrics, self.pulls, self.fills)
        # Asked by the cache only; a test that needs a registry down adds it to the addons and
        # hands it to the upstream, as make_addons does.
        self.circuits = Circuits(self.hosts, self.metrics, self.upstream)
        self.cache = RegistryCache(self.hosts, self.folder, self.misses, self.manifests, self.blobs, self.upstream, self.circuits)

    def addons(self) -> list:
        """The addons for `taddons.context`, in make_addons' order (those with options or hooks)."""
        return [self.options, self.folder, self.hosts, self.routes, self.access, self.fleet, self.misses, self.blobhost, self.cache]

    async def request(self, flow) -> None:
        """The request hook of the data path, as mitmproxy runs it: the route is parsed, then the cache acts."""
        self.routes.requestheaders(flow)
        await self.cache.request(flow)

    @property
    def store(self):
        return self.folder.store
