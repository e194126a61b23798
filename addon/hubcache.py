"""hubcache as a mitmproxy script: `mitmdump -s addon/hubcache.py --set cache_dir=DIR`."""

from addon.access import Access
from addon.blobhost import BlobHost
from addon.cache import RegistryCache
from addon.circuits import Circuits
from addon.destinations import Destinations
from addon.fleet import Fleet
from addon.hosts import Interception, Passthrough, UpstreamOverride
from addon.metrics import Metrics
from addon.pulls import PullLog
from addon.recorder import Recorder
from addon.registries import UpstreamCredentials
from addon.statuspage import StatusPage
from addon.upkeep import Upkeep
from addon.upstream import Answers


def make_addons() -> list:
    """A fresh set of hubcache's addons, in hook order: where clients may go first (before any
    addon reroutes a connection), then hosts, the cache before the recorder."""
    interception = Interception()
    override = UpstreamOverride()
    blobs = BlobHost()
    destinations = Destinations(override, blobs)
    access = Access()
    metrics = Metrics(interception)
    pulls = PullLog()
    blobs.on_sent += [metrics.sent_by_tag, pulls.sent]
    fleet = Fleet()
    cache = RegistryCache(interception, blobs, access, metrics, pulls, fleet)
    status = StatusPage(cache, metrics, pulls)
    destinations.own_ports.append(status.ports)
    return [
        destinations,
        Circuits(interception, metrics),
        interception,
        override,
        UpstreamCredentials(interception),
        Passthrough(interception),
        Answers(),
        blobs,
        access,
        metrics,
        pulls,
        fleet,
        cache,
        Recorder(interception, cache),
        Upkeep(cache),
        status,
    ]


addons = make_addons()
