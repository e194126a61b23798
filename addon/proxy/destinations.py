"""Where clients of the proxy may go: never to hubcache's own listeners, and, when the proxy serves
a network (`local_destinations`), not to this host's loopback, link-local or own addresses, nor a
cloud's metadata addresses. The check is made on the addresses a name resolves to, and the
connection goes to the address checked; the blob server's `blob_listen` listener is hubcache's own
and let through."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import mode_specs, server_hooks

from ..blobserver.host import BlobHost
from ..blobserver.server import BLOB_HOST
from ..mitm import internals
from ..mitm.flows import is_subrequest
from .interception import UpstreamOverride

logger = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The clouds' metadata and host services outside link-local (169.254.169.254 and fe80::/10 are).
METADATA = tuple(
    ipaddress.ip_network(n)
    for n in (
        "fd00:ec2::254/128",  # AWS: the instance metadata service over IPv6 (Nitro)
        "fd00:ec2::253/128",  # AWS: the VPC's DNS resolver over IPv6
        "fd00:ec2::123/128",  # AWS: the time service over IPv6
        "100.100.100.200/32",  # Alibaba Cloud: the instance metadata service
        "168.63.129.16/32",  # Azure: the host's WireServer (goal state, certificates)
        "192.0.0.192/32",  # Oracle Cloud: the legacy instance metadata address
    )
)


class Refused(Exception):
    """A destination clients of the proxy may not reach; the message says why."""


class Destinations:
    def __init__(self, override: UpstreamOverride, blobs: BlobHost) -> None:
        self.override = override
        self.blobs = blobs
        # Callables giving the ports of hubcache's other listeners (the status page's); the
        # proxy's own come from mitmproxy, the blob server's from `blobs`.
        self.own_ports: list[Callable[[], Iterable[int]]] = [blobs.ports]
        self._allowed: list[tuple[Network, int | None]] = []

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "local_destinations",
            str,
            "auto",
            "Whether clients of the proxy may reach this host's loopback, link-local and own "
            "addresses: 'refuse', 'allow', or 'auto' (refused when the proxy listens beyond "
            "loopback). hubcache's own listeners are never reachable through the proxy.",
            choices=("auto", "refuse", "allow"),
        )
        loader.add_option(
            "local_destinations_allowed",
            Sequence[str],
            [],
            "Local destinations clients may still reach when they are refused: ADDRESS[/BITS][:PORT], "
            "e.g. 127.0.0.1:5000 or [::1]:5000.",
        )

    def configure(self, updated: set[str]) -> None:
        if "local_destinations_allowed" in updated:
            allowed = []
            for entry in ctx.options.local_destinations_allowed:
                try:
                    allowed.append(_parse_allowed(entry))
                except ValueError:
                    raise exceptions.OptionsError(
                        f"local_destinations_allowed: {entry!r} is not ADDRESS[/BITS][:PORT] (e.g. 127.0.0.1:5000)"
                    ) from None
            self._allowed = allowed

    # hooks

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        await self._refuse(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        # Plain HTTP names its destination per request (absolute form); TLS was checked at CONNECT.
        if flow.response or flow.error or is_subrequest(flow) or flow.client_conn.tls_established:
            return
        await self._refuse(flow)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Every connection mitmproxy opens, hubcache's own requests (and the redirects they
        follow) included: checked, then pinned to the address that was checked."""
        server = data.server
        if server.address is None or server.error:
            return
        if server.address in self._proxies():
            return  # a tunnel to an upstream proxy: the operator's, or the blob server's own
        try:
            address = await self.check(*server.address, via_proxy=server.via is not None)
        except Refused as e:
            logger.warning(f"hubcache: {e}")
            server.error = f"hubcache: {e}"
            return
        if address is not None:
            server.address = (address, server.address[1])

    async def _refuse(self, flow: http.HTTPFlow) -> None:
        try:
            await self.check(flow.request.host, flow.request.port, via_proxy=flow.server_conn.via is not None)
        except Refused as e:
            logger.info(f"hubcache: refused {flow.client_conn.peername[0]}: {e}")
            body = f"hubcache: {e}\n".encode()
            flow.response = http.Response.make(403, body, {"Content-Type": "text/plain; charset=utf-8"})

    # the decision

    async def check(self, host: str, port: int, via_proxy: bool = False) -> str | None:
        """Raise Refused if clients may not reach host:port; else the address to connect to (None:
        as named). Behind an upstream proxy, that proxy resolves names: only literal addresses
        and `localhost` are judged."""
        name = host.lower().strip("[]")
        if name == BLOB_HOST or self.blobs.is_direct(name, port) or self.override.maps(name, port):
            return None
        addresses = _literal(name)
        if addresses is None:
            if via_proxy:
                addresses = [ipaddress.ip_address("127.0.0.1")] if _is_localhost(name) else []
            else:
                addresses = await _resolve(name, port)
        if not addresses:
            return None  # unresolvable: mitmproxy says so itself
        refuse_local = self._refuses_local()
        for address in addresses:
            where = _local(address)
            if where and port in self._own_ports():
                raise Refused(f"{host}:{port} is hubcache's own listener, not reachable through the proxy")
            if where and refuse_local and not self._is_allowed(address, port):
                raise Refused(f"{host}:{port} is {where}, not reachable through this proxy")
        return None if via_proxy else str(addresses[0])

    def _proxies(self) -> list[tuple[str, int]]:
        proxies = [("127.0.0.1", self.blobs.tunnel_port)] if self.blobs.tunnel_port else []
        for spec in ctx.options.mode:
            mode = mode_specs.ProxyMode.parse(spec)
            if isinstance(mode, mode_specs.UpstreamMode):
                proxies.append(mode.address)
        return proxies

    def _refuses_local(self) -> bool:
        mode = ctx.options.local_destinations
        if mode == "auto":
            return any(_serves_network(spec) for spec in ctx.options.mode)
        return mode == "refuse"

    def _own_ports(self) -> set[int]:
        ports = {address[1] for address in internals.listen_addrs()}
        for own in self.own_ports:
            ports.update(own())
        return ports

    def _is_allowed(self, address: Address, port: int) -> bool:
        return any(address in network and allowed in (None, port) for network, allowed in self._allowed)


def _serves_network(spec: str) -> bool:
    """Whether the listener of a `mode` spec takes clients from beyond this host."""
    mode = mode_specs.ProxyMode.parse(spec)
    if isinstance(mode, (mode_specs.LocalMode, mode_specs.OsProxyMode)):
        return False  # this host's own processes, redirected
    host = mode.listen_host(ctx.options.listen_host).strip("[]").lower()
    if _is_localhost(host):
        return False
    addresses = _literal(host)
    return addresses is None or not addresses[0].is_loopback  # "": every interface


def _literal(name: str) -> list[Address] | None:
    try:
        return [ipaddress.ip_address(name)]
    except ValueError:
        return None


def _is_localhost(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost")


async def _resolve(name: str, port: int) -> list[Address]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    hosts = [info[4][0] for info in infos]
    # An IP socket address starts with the host as text ((int, bytes) only from a Python built without IPv6).
    return [ipaddress.ip_address(host.partition("%")[0]) for host in hosts if isinstance(host, str)]


def plain(address: Address) -> Address:
    """`address`, or the IPv4 address it carries written as IPv6 (::ffff:a.b.c.d)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _local(address: Address) -> str:
    """What makes `address` local to this host ('' if nothing does)."""
    address = plain(address)
    if address.is_loopback or address.is_unspecified:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if any(address in network for network in METADATA):
        return "a cloud metadata address"
    if _is_own(address):
        return "an address of this host"
    return ""


def _is_own(address: Address) -> bool:
    """Whether one of this host's interfaces has `address`: only then can a socket bind to it."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
        return True
    except OSError:
        return False


def _parse_allowed(entry: str) -> tuple[Network, int | None]:
    text = entry.strip()
    port: int | None = None
    if text.startswith("["):
        inside, _, rest = text[1:].partition("]")
        text = inside
        if rest:
            if not rest.startswith(":"):
                raise ValueError(entry)
            port = int(rest[1:])
    elif text.count(":") == 1:
        text, _, number = text.partition(":")
        port = int(number)
    if port is not None and not 0 < port < 65536:
        raise ValueError(entry)
    return ipaddress.ip_network(text, strict=False), port
