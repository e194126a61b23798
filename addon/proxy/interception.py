"""Which connections hubcache intercepts (the registries' API hosts and their token hosts, on their
own port), which requests it treats as a registry's (the CONNECT target, the SNI and the `Host`
agree), and where upstream connections go (`upstream_map`). Everything else is relayed untouched."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.net.http import url
from mitmproxy.proxy import layer, server_hooks

from ..blobserver.host import MirrorListener
from ..mitm import bodies, internals
from ..mitm.flows import Mark, is_subrequest
from ..registry import settings as registries
from ..registry.settings import AUTH_HOSTS, DEFAULT_REGISTRIES, Settings

logger = logging.getLogger(__name__)

# The port a registry and its token host are intercepted on. Every registry hubcache knows serves
# its API on https's port; `upstream_map` sends a name elsewhere without changing the port clients
# use (tests point registries at local servers that way).
OWN_PORT = 443


class Interception:
    """The registries (options `registries` and `registry_settings`): their hosts are
    intercepted; everything else is tunnelled."""

    def __init__(self, mirror: MirrorListener | None = None) -> None:
        self.mirror = mirror or MirrorListener()  # set by proxy/mirror.py
        self.settings: dict[str, Settings] = {}  # by registry host
        self._registries: set[str] = set(DEFAULT_REGISTRIES)
        self._intercepted = self._registries | {AUTH_HOSTS[h] for h in self._registries if h in AUTH_HOSTS}

    def load(self, loader: Loader) -> None:
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

    def configure(self, updated: set[str]) -> None:
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
                    raise exceptions.OptionsError(f"registry_settings: {e}") from e
                settings[host] = parsed
            self.settings = settings
        if "ssl_insecure" in updated and ctx.options.ssl_insecure:
            logger.warning(
                "hubcache: ssl_insecure is on: upstream answers are not verified, so anyone on the "
                "path to a registry can put content into the cache"
            )
        if "registries" in updated or "registry_settings" in updated:
            self._registries = {h.lower() for h in ctx.options.registries} | set(self.settings)
            self._intercepted = self._registries | {AUTH_HOSTS[h] for h in self._registries if h in AUTH_HOSTS}

    def is_registry(self, host: str) -> bool:
        return host.lower() in self._registries

    def intercepts(self, host: str) -> bool:
        return host.lower() in self._intercepted

    def destination(self, flow: http.HTTPFlow) -> str | None:
        """The intercepted host (a registry or its token host) this request verifiably goes to,
        or None: see the module's docstring. hubcache's own requests go where they say."""
        request = flow.request
        host = request.host.lower()
        if request.scheme != "https" or request.port != OWN_PORT or not self.intercepts(host):
            return None
        if is_subrequest(flow):
            return host
        if self.is_mirror(flow.client_conn):
            # The mirror's listener names no destination: `Mirror` routed the request to the
            # registry (or learned token realm) it is for, whatever the client wrote.
            return host if flow.metadata.get(Mark.MIRROR) else None
        if (flow.client_conn.sni or "").lower() != host:
            return None
        claimed = request.host_header
        if claimed is not None:
            try:
                claimed_host, _ = url.parse_authority(claimed, check=True)
            except ValueError:
                return None
            if claimed_host.lower() != host:
                return None
        return host

    def is_mirror(self, client: connection.Client) -> bool:
        """Whether the client connected to the mirror's listener (mitmproxy says which)."""
        return self.mirror.mode is not None and client.proxy_mode.full_spec == self.mirror.mode

    def registry(self, flow: http.HTTPFlow) -> str | None:
        """The registry API host this request verifiably goes to, or None."""
        host = self.destination(flow)
        return host if host and self.is_registry(host) else None

    def tag_freshness(self, host: str) -> int:
        """Seconds a tag of the registry at `host` is served without asking upstream."""
        own = self.settings.get(host.lower())
        return own.tag_freshness if own and own.tag_freshness is not None else ctx.options.tag_freshness

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # Intercept only TLS whose SNI names the host the tunnel goes to, on its own port: a
        # registry's name in the SNI of a tunnel to elsewhere gets no certificate for that name
        # from hubcache, and a tunnel to another port of it is the client's business.
        if self.is_mirror(data.context.client):
            return  # the mirror's own TLS (proxy/mirror.py)
        sni = (data.client_hello.sni or "").lower()
        target, port = data.context.server.address or ("", 0)
        if not (sni and sni == target.lower() and port == OWN_PORT and self.intercepts(sni)):
            data.ignore_connection = True


class UpstreamOverride:
    """Connects chosen upstream host names to other addresses (option `upstream_map`).

    For pointing a registry name at an internal mirror, or at a test server, without touching
    DNS or /etc/hosts. TLS still verifies the original name. Only connections to the name's own
    port (`OWN_PORT`) are sent elsewhere: another port of the name is an ordinary destination.
    Behind an upstream proxy (`--mode upstream:...`) the connection opened is the one to that
    proxy, so the map rewrites the target of the CONNECT sent through it instead.
    """

    def __init__(self) -> None:
        self.map: dict[str, tuple[str, int]] = {}

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "upstream_map",
            Sequence[str],
            [],
            "Connect upstream host names (their port 443) elsewhere: HOST=ADDRESS:PORT, e.g. "
            "registry-1.docker.io=10.0.0.5:443. TLS still verifies HOST.",
        )

    def configure(self, updated: set[str]) -> None:
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

    def maps(self, host: str, port: int) -> tuple[str, int] | None:
        """Where a connection to host:port goes instead, if the map sends it elsewhere."""
        return self.map.get(host.lower()) if port == OWN_PORT else None

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address and (target := self.maps(*data.server.address)):
            data.server.address = target

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        if target := self.maps(flow.request.host, flow.request.port):
            host, port = target
            flow.request.host, flow.request.port = target
            # The CONNECT line is written from the authority, which must bracket an IPv6 literal.
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            flow.request.authority = authority
            if "Host" in flow.request.headers:
                flow.request.headers["Host"] = authority


class Passthrough:
    """What hubcache does not answer passes through as it comes: request and response bodies are
    streamed, never held whole in the proxy's memory (whatever Content-Length, chunking or HTTP/2
    framing say).

    The exception is a request hubcache answers itself (a pull from a registry, anything to a
    registry while offline, a token request, whatever an earlier addon answered already): it
    takes no body, and one that comes anyway is refused before it is read (mitm/bodies.py). A token
    request may bring a small form of announced length, read whole."""

    def __init__(self, hosts: Interception):
        self.hosts = hosts

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        # mitmproxy's own choice first (its addon runs after hubcache's), then the guard on it.
        if nextlayer.layer is None:
            internals.next_layer(nextlayer)
        internals.http_after_interception(nextlayer)
        internals.guard(nextlayer.layer)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if is_subrequest(flow):
            return
        if flow.response:
            bodies.takes_none(flow)  # answered already (the mirror's early answers, refusals)
            return
        host = self.hosts.destination(flow)
        token_host = host is not None and not self.hosts.is_registry(host)
        if host and (token_host or request.method in ("GET", "HEAD") or ctx.options.offline):
            if token_host and request.method == "POST" and _body_size(request) <= MAX_FORM:
                return  # a token form (containerd's): read whole, no longer than it said
            bodies.takes_none(flow)
            return
        # Also when the headers announce no body: over HTTP/2 one may come without a length.
        request.stream = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        # Answers made by hubcache arrive here whole (content set); upstream's have none yet.
        if response is None or response.stream or response.raw_content is not None or is_subrequest(flow):
            return
        response.stream = True


MAX_FORM = 64 * 1024  # a token request's form: credentials and scopes


def _body_size(request: http.Request) -> float:
    """The size a request announces for its body (infinite when chunked or unreadable)."""
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() and "transfer-encoding" not in request.headers else float("inf")
