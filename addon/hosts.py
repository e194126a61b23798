"""Which connections hubcache intercepts, and where upstream connections go.

Only registry traffic is intercepted: the registries' API hosts and their token hosts. Every other
TLS connection is tunnelled untouched, so hubcache never sees or breaks anything else (blob
hosts too: hubcache follows a registry's blob redirects itself, and its own blob server is
reached through a tunnel).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.proxy import server_hooks

from . import registries
from .registries import AUTH_HOSTS, DEFAULT_REGISTRIES, Settings

logger = logging.getLogger(__name__)


class Interception:
    """The registries (options `registries` and `registry_settings`): their hosts are
    intercepted; everything else is tunnelled."""

    def __init__(self) -> None:
        self.settings: dict[str, Settings] = {}  # by registry host
        self._registries: set[str] = set(DEFAULT_REGISTRIES)
        self._intercepted = self._registries | {AUTH_HOSTS[h] for h in self._registries if h in AUTH_HOSTS}

    def load(self, loader):
        loader.add_option(
            "registries",
            Sequence[str],
            list(DEFAULT_REGISTRIES),
            "Registry API hosts to cache (their token hosts are intercepted too). "
            "Every other host is tunnelled untouched.",
        )
        loader.add_option(
            "registry_settings",
            Sequence[str],
            [],
            "Per-registry settings, HOST:KEY=VALUE[,KEY=VALUE]; naming a host also caches it. Keys: "
            "tag_freshness=SECONDS, credentials=@FILE or env:NAME (holding USER:SECRET, presented "
            "upstream for clients that bring none).",
        )

    def configure(self, updated):
        if "registries" in updated:
            for host in ctx.options.registries:
                if not host or any(c in host for c in "/: ") or host != host.strip():
                    raise exceptions.OptionsError(
                        f"registries: {host!r} is not a host name (write e.g. ghcr.io, no port)"
                    )
        if "registry_settings" in updated:
            settings = {}
            for entry in ctx.options.registry_settings:
                try:
                    host, parsed = registries.parse(entry)
                except ValueError as e:
                    raise exceptions.OptionsError(f"registry_settings: {e}")
                settings[host] = parsed
            self.settings = settings
        if "registries" in updated or "registry_settings" in updated:
            self._registries = {h.lower() for h in ctx.options.registries} | set(self.settings)
            self._intercepted = self._registries | {AUTH_HOSTS[h] for h in self._registries if h in AUTH_HOSTS}

    def is_registry(self, host: str) -> bool:
        return host.lower() in self._registries

    def intercepts(self, host: str) -> bool:
        return host.lower() in self._intercepted

    def tag_freshness(self, host: str) -> int:
        """Seconds a tag of the registry at `host` is served without asking upstream."""
        own = self.settings.get(host.lower())
        return own.tag_freshness if own and own.tag_freshness is not None else ctx.options.tag_freshness

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        host = data.client_hello.sni or (
            data.context.server.address[0] if data.context.server.address else ""
        )
        if not self.intercepts(host):
            data.ignore_connection = True


class UpstreamOverride:
    """Connects chosen upstream host names to other addresses (option `upstream_map`).

    For pointing a registry name at an internal mirror, or at a test server, without touching
    DNS or /etc/hosts. TLS still verifies the original name. Behind an upstream proxy
    (`--mode upstream:...`) the connection opened is the one to that proxy, so the map rewrites
    the target of the CONNECT sent through it instead.
    """

    def __init__(self) -> None:
        self.map: dict[str, tuple[str, int]] = {}

    def load(self, loader):
        loader.add_option(
            "upstream_map",
            Sequence[str],
            [],
            "Connect upstream host names elsewhere: HOST=ADDRESS:PORT, e.g. "
            "registry-1.docker.io=10.0.0.5:443. TLS still verifies HOST.",
        )

    def configure(self, updated):
        if "upstream_map" in updated:
            mapping = {}
            for spec in ctx.options.upstream_map:
                host, sep, target = spec.partition("=")
                address, colon, port = target.rpartition(":")
                if not (sep and host and colon and address and port.isdigit() and 0 < int(port) < 65536):
                    raise exceptions.OptionsError(
                        f"upstream_map: {spec!r} is not HOST=ADDRESS:PORT"
                    )
                mapping[host.lower()] = (address.strip("[]"), int(port))
            self.map = mapping

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address and (target := self.map.get(data.server.address[0].lower())):
            data.server.address = target

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        if target := self.map.get(flow.request.host.lower()):
            host, port = target
            flow.request.host, flow.request.port = target
            # The CONNECT line is written from the authority, which must bracket an IPv6 literal.
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            flow.request.authority = authority
            if "Host" in flow.request.headers:
                flow.request.headers["Host"] = authority
