"""hubcache: a pull-through cache for container registries, as mitmproxy addons.

The packages are layers; each imports only from the layers below it (docs/architecture.md,
enforced by tests/unit/test_layers.py): registry, storage, fleet, blobserver, mitm, proxy, observe,
upstream, cache, prefetch; `addons.py` wires them; `cli` is the command line."""
