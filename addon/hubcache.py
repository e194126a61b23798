"""hubcache as a mitmproxy script: `mitmdump -s addon/hubcache.py --set cache_dir=DIR`."""

from addon.access import Access
from addon.blobhost import BlobHost
from addon.cache import RegistryCache
from addon.fleet import Fleet
from addon.hosts import Interception, UpstreamOverride
from addon.metrics import Metrics
from addon.pulls import PullLog
from addon.recorder import Recorder
from addon.registries import UpstreamCredentials
from addon.statuspage import StatusPage
from addon.upkeep import Upkeep


def make_addons() -> list:
    """A fresh set of hubcache's addons, in hook order: hosts first, the cache before the recorder."""
    interception = Interception()
    blobs = BlobHost()
    access = Access()
    metrics = Metrics(interception)
    pulls = PullLog()
    blobs.on_sent += [metrics.sent_by_tag, pulls.sent]
    fleet = Fleet()
    cache = RegistryCache(interception, blobs, access, metrics, pulls, fleet)
    return [
        interception,
        UpstreamOverride(),
        UpstreamCredentials(interception),
        blobs,
        access,
        metrics,
        pulls,
        fleet,
        cache,
        Recorder(interception, cache),
        Upkeep(cache),
        StatusPage(cache, metrics, pulls),
    ]


addons = make_addons()
