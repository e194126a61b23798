"""The addon set: every hubcache addon, wired together in one place."""

from .blobserver.host import BlobHost, MirrorListener
from .cache.access import Access
from .cache.blob_path import BlobRequests
from .cache.fills import Fills
from .cache.hooks import RegistryCache
from .cache.manifest_path import ManifestRequests
from .cache.misses import Misses
from .cache.policy import ImagePolicy
from .cache.recorder import Recorder
from .fleet.node import Fleet
from .mitm import internals
from .mitm.fail_closed import fail_closed
from .observe.loop_lag import LoopLag
from .observe.metrics import Metrics
from .observe.pull_log import PullLog
from .observe.status_page import StatusPage
from .options import CommonOptions
from .prefetch.watch import Watch
from .proxy.client_share import ClientShare
from .proxy.credentials import TokenRealms, UpstreamCredentials
from .proxy.destinations import Destinations
from .proxy.interception import Interception, Passthrough, UpstreamOverride
from .proxy.mirror import Mirror, MirrorChallenges
from .proxy.routes import Routes
from .storage.eviction import Upkeep
from .storage.folder import CacheFolder
from .upstream.circuits import Circuits
from .upstream.client import BoundedAnswers, Upstream


def make_addons() -> list:
    """A fresh set of hubcache's addons, in hook order: the options first, then where clients may
    go (before any addon reroutes a connection), then hosts, the cache before the recorder. Each
    fails closed: a hook that fails on a request ends it (mitm/fail_closed.py)."""
    listener = MirrorListener()  # the mirror's listener: set by the mirror, read by interception and the blob host
    realms = TokenRealms()  # learned by the credentials and the mirror, read by both
    interception = Interception(listener)
    override = UpstreamOverride()
    blobs = BlobHost(internals.certstore, listener)
    destinations = Destinations(override, blobs)
    out = Upstream()  # hubcache's own requests upstream
    folder = CacheFolder()
    access = Access(out)
    metrics = Metrics(interception)
    pulls = PullLog()
    blobs.on_sent += [metrics.sent_by_tag, pulls.sent]
    fleet = Fleet()
    misses = Misses(folder, metrics, out)
    circuits = Circuits(interception, metrics, out)
    out.circuits = circuits  # asked before each of hubcache's own requests; its probes go out through `out`
    cache = RegistryCache(
        interception,
        folder,
        misses,
        ManifestRequests(interception, folder, misses, access, metrics, pulls, fleet, out),
        BlobRequests(folder, misses, blobs, access, metrics, pulls, Fills(folder, misses, access, metrics, fleet, out)),
        out,
        circuits,
    )
    upkeep = Upkeep(folder)
    watch = Watch(interception, folder, circuits, fleet, upkeep, metrics, out)
    status = StatusPage(folder, metrics, pulls, watch)
    mirror = Mirror(interception, blobs, listener, realms)
    destinations.own_ports.append(status.ports)
    addons = [
        CommonOptions(),
        ClientShare(),  # first: a connection beyond its client's share goes no further
        folder,
        destinations,
        circuits,
        interception,
        mirror,
        override,
        watch,  # before Routes: it takes its mark off the watch's own requests first
        Routes(interception),  # before any addon that acts on a registry request
        UpstreamCredentials(interception, realms),  # before MirrorChallenges: it learns from upstream's own answer
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
        LoopLag(metrics),
    ]
    return fail_closed(addons)


class Hubcache:
    """Every hubcache addon as one addon of mitmproxy's chain, its children, as
    `mitmdump -s addon/script.py` holds them under the script. mitmproxy pays per addon of its
    chain on every event (a safecall, a coroutine and a generator), and a connection through the
    proxy is some twenty events; a child costs an attribute lookup. (25 addons beside mitmproxy's
    36 made each connection cost a sixth more CPU.)"""

    def __init__(self) -> None:
        self.addons = make_addons()
