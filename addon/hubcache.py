"""hubcache as a mitmproxy script: `mitmdump -s addon/hubcache.py --set cache_dir=DIR`."""

from addon.cache import RegistryCache
from addon.hosts import Interception, UpstreamOverride

interception = Interception()

addons = [interception, UpstreamOverride(), RegistryCache(interception)]
