"""hubcache's side of mitmproxy's flows: the marks it notes on a flow, the answers it writes, and
the one place it reaches into mitmproxy's HTTP layer."""
