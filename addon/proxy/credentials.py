"""Presents the credentials of `registry_settings` (`registry.settings`) upstream, for clients that
bring none."""

from __future__ import annotations

from urllib.parse import urlsplit

from mitmproxy import http

from ..mitm.flows import is_subrequest
from ..registry import protocol
from .interception import Interception
from .routes import route_of

# The query of a token request made with the account's credentials keeps only these (and its scopes).
TOKEN_QUERY = ("service", "client_id", "account")


class TokenRealms:
    """The token realms registries' own Bearer challenges named (over https, from a request that
    verifiably went to the registry): where the account's credentials may go (UpstreamCredentials)
    and where the mirror relays its clients' token requests (proxy/mirror.py). One table for both."""

    def __init__(self) -> None:
        self._registries: dict[tuple[str, int, str], str] = {}  # (host, port, path) -> registry

    def learn(self, host: str, port: int, path: str, registry: str) -> None:
        self._registries[(host.lower(), port, path or "/")] = registry

    def registry(self, host: str, port: int, path: str) -> str | None:
        """The registry whose challenge named this realm, or None."""
        return self._registries.get((host, port, path))


class UpstreamCredentials:
    """Presents the credentials of `registry_settings` upstream, for clients that bring none.

    Only on pulls (GET and HEAD of manifests, blobs and referrers, and token requests), only where
    the request verifiably goes to the registry itself (`Interception.destination`) or to the token
    realm its own verified 401 named, and a token request made with them asks for `pull` of
    repositories and nothing else: no push, no delete, no catalog, no refresh token."""

    def __init__(self, hosts: Interception, realms: TokenRealms):
        self.hosts = hosts
        self.realms = realms
        self._basic: set[str] = set()  # registries that asked for Basic on their API

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # hubcache's own requests copy a client's headers, except the anonymous probe of a
        # repository's visibility (cache/access.py), which must stay anonymous.
        request = flow.request
        if flow.response or "authorization" in request.headers or is_subrequest(flow):
            return
        host = self.hosts.destination(flow)
        if host is None or request.method not in ("GET", "HEAD"):
            return
        registry = self.realms.registry(host, request.port, request.path.partition("?")[0])
        if registry is not None and registry not in self.hosts.settings:
            registry = None  # a realm the mirror learned, of a registry without settings
        if registry is not None:
            scopes = pull_scopes(request.query.get_all("scope"))
            if not scopes:
                return  # a login check or a catalog: nothing the account needs to be for
            request.query = [(k, v) for k, v in request.query.items(multi=True) if k in TOKEN_QUERY] + [
                ("scope", scope) for scope in scopes
            ]
        elif host in self._basic and (route := route_of(flow)) and route.kind in protocol.PULLS:
            registry = host
        own = self.hosts.settings.get(registry or "")
        if own and own.credentials:
            request.headers["authorization"] = own.basic

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Learn where a configured registry sends clients for tokens, and whether it wants Basic,
        from its answer as it came (before the mirror rewrites it for its clients)."""
        host = self.hosts.destination(flow)
        if not flow.response or flow.response.status_code != 401 or host not in self.hosts.settings:
            return
        scheme, fields = protocol.challenge(flow.response.headers.get("www-authenticate", ""))
        realm = urlsplit(fields.get("realm", ""))
        if scheme == "bearer" and realm.scheme == "https" and realm.hostname:
            try:
                port = realm.port or 443
            except ValueError:
                return  # not a URL anyone could be sent to
            self.realms.learn(realm.hostname, port, realm.path, host)
        elif scheme == "basic":
            self._basic.add(host)


def pull_scopes(requested: list[str]) -> list[str]:
    """`repository:NAME:pull` for every repository among the requested scopes, whatever actions
    they asked for; every other scope is dropped."""
    scopes = []
    for item in (part for value in requested for part in value.split()):
        kind, _, rest = item.partition(":")
        name, _, _ = rest.rpartition(":")
        if kind == "repository" and protocol.NAME_RE.fullmatch(name):
            scopes.append(f"repository:{name}:pull")
    return scopes
