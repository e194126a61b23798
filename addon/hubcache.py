"""hubcache as a mitmproxy script: `mitmdump -s addon/hubcache.py --set cache_dir=DIR`."""

from addon.cache import RegistryCache
from addon.hosts import Interception, UpstreamOverride
from addon.recorder import Recorder

interception = Interception()
cache = RegistryCache(interception)

addons = [interception, UpstreamOverride(), cache, Recorder(interception, cache)]
