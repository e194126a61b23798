"""The addon set: every hubcache addon, wired together in one place."""

from .access import Access
from .blobhost import BlobHost
from .cache import RegistryCache
from .circuits import Circuits
from .destinations import Destinations
from .fleet import Fleet
from .hosts import Interception, Passthrough, UpstreamOverride
from .metrics import Metrics
from .pulls import PullLog
from .recorder import Recorder
from .registries import UpstreamCredentials
from .statuspage import StatusPage
from .upkeep import Upkeep
from .upstream import Answers


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

