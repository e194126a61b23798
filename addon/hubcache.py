"""hubcache as a mitmproxy script: `mitmdump -s addon/hubcache.py --set cache_dir=DIR`."""

from addon.access import Access
from addon.blobhost import BlobHost
from addon.cache import RegistryCache
from addon.hosts import Interception, UpstreamOverride
from addon.recorder import Recorder
from addon.upkeep import Upkeep


def make_addons() -> list:
    """A fresh set of hubcache's addons, in hook order: hosts first, the cache before the recorder."""
    interception = Interception()
    blobs = BlobHost()
    access = Access()
    cache = RegistryCache(interception, blobs, access)
    return [interception, UpstreamOverride(), blobs, access, cache, Recorder(interception, cache), Upkeep(cache)]


addons = make_addons()
