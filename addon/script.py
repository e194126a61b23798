"""hubcache as a mitmproxy script: `mitmdump -s addon/script.py --set cache_dir=DIR`.

mitmproxy loads this file by path; the addons come from the installed `hubcache` package
(`pip install .`, or `pip install -e .` in a checkout)."""

try:
    from hubcache.addons import make_addons
except ModuleNotFoundError as e:
    if e.name != "hubcache":
        raise
    raise SystemExit("hubcache is not installed in mitmdump's Python: run `pip install .` in the checkout") from None

addons = make_addons()
