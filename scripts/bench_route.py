"""A mitmproxy script for the benchmark's plain-mitmdump path: it only connects chosen host names
to other addresses (`--set route=HOST=ADDRESS:PORT`), so a client can pull from a test registry
by name through mitmproxy with nothing else added. TLS to the upstream still verifies HOST."""

from collections.abc import Sequence

from mitmproxy import ctx, exceptions
from mitmproxy.proxy import server_hooks


class Route:
    def __init__(self) -> None:
        self.map: dict[str, tuple[str, int]] = {}

    def load(self, loader) -> None:
        loader.add_option("route", Sequence[str], [], "HOST=ADDRESS:PORT: connect HOST to ADDRESS:PORT")

    def configure(self, updated: set[str]) -> None:
        if "route" in updated:
            self.map = {}
            for spec in ctx.options.route:
                host, _, target = spec.partition("=")
                address, _, port = target.rpartition(":")
                if not (host and address and port.isdigit()):
                    raise exceptions.OptionsError(f"route: {spec!r} is not HOST=ADDRESS:PORT")
                self.map[host.lower()] = (address, int(port))

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address and (target := self.map.get(data.server.address[0].lower())):
            data.server.address = target


addons = [Route()]
