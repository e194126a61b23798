"""The addon set: every hubcache addon, wired together in one place."""

from .access import Access
from .blob_requests import BlobRequests
from .blobhost import BlobHost
from .cache import RegistryCache
from .circuits import Circuits
from .credentials import UpstreamCredentials
from .destinations import Destinations
from .fleet import Fleet
from .hosts import Interception, Passthrough, UpstreamOverride
from .manifest_requests import ManifestRequests
from .metrics import Metrics
from .mirror import Mirror, MirrorChallenges
from .misses import Misses
from .options import SharedOptions
from .policy import ImagePolicy
from .pulls import PullLog
from .recorder import Recorder
from .routes import Routes
from .statuspage import StatusPage
from .storage import CacheFolder
from .upkeep import Upkeep
from .upstream import BoundedAnswers, Upstream
from .watch import Watch


def make_addons() -> list:
    """A fresh set of hubcache's addons, in hook order: the options first, then where clients may
    go (before any addon reroutes a connection), then hosts, the cache before the recorder."""
    interception = Interception()
    override = UpstreamOverride()
    blobs = BlobHost()
    destinations = Destinations(override, blobs)
    out = Upstream()  # hubcache's own requests upstream
    folder = CacheFolder()
    access = Access(out)
    metrics = Metrics(interception)
    pulls = PullLog()
    blobs.on_sent += [metrics.sent_by_tag, pulls.sent]
    fleet = Fleet()
    misses = Misses(folder, metrics, out)
    cache = RegistryCache(
        interception,
        folder,
        misses,
        ManifestRequests(interception, folder, misses, access, metrics, pulls, fleet, out),
        BlobRequests(folder, misses, blobs, access, metrics, pulls, fleet, out),
        out,
    )
    circuits = Circuits(interception, metrics, out)
    upkeep = Upkeep(folder)
    watch = Watch(interception, folder, circuits, fleet, upkeep, metrics, out)
    status = StatusPage(folder, metrics, pulls, watch)
    mirror = Mirror(interception, blobs)
    destinations.own_ports.append(status.ports)
    return [
        SharedOptions(),
        folder,
        destinations,
        circuits,
        interception,
        mirror,
        override,
        watch,  # before Routes: it takes its mark off the watch's own requests first
        Routes(interception),  # before any addon that acts on a registry request
        UpstreamCredentials(interception),
        BoundedAnswers(),
        blobs,
        Passthrough(interception),  # after every addon that answers in requestheaders
        access,
        metrics,
        pulls,
        fleet,
        ImagePolicy(folder, metrics),  # before the cache: a refused pull goes nowhere
        misses,
        cache,
        MirrorChallenges(mirror),
        Recorder(folder),
        upkeep,
        status,
    ]
