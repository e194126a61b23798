"""The registries hubcache caches out of the box, and per-registry settings (option
`registry_settings`, declared with the registries in `hosts.py`): how fresh a tag may be, and the
credentials hubcache presents upstream.

Each entry is `HOST[:KEY=VALUE[,KEY=VALUE...]]`, and naming a host here also caches it:
- `tag_freshness=SECONDS`: overrides the `tag_freshness` option for this registry.
- `credentials=@FILE` or `credentials=env:NAME`: `USER:SECRET` (a password or an access token)
  read from a file or an environment variable, never from the option itself, so it does not end
  up in process listings or shell history.

Credentials are presented where a client presented none, on pulls only: on the registry's token
requests (the realm its own 401 challenges name, learned as they pass), narrowed to `pull`, and on
its API requests when it asks for Basic authentication. So anonymous clients pull as that account:
with its rate limit, and with its access to private repositories, which every client of the
proxy then shares.
"""

from __future__ import annotations

import base64
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mitmproxy import http

from . import protocol, upstream

if TYPE_CHECKING:
    from .hosts import Interception

logger = logging.getLogger(__name__)

# The registries cached out of the box (their API hosts).
DEFAULT_REGISTRIES = (
    "registry-1.docker.io",
    "index.docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "public.ecr.aws",
    "mcr.microsoft.com",
)
# Token hosts of the registries whose token service lives on another host.
AUTH_HOSTS = {"registry-1.docker.io": "auth.docker.io", "index.docker.io": "auth.docker.io"}
KEYS = ("tag_freshness", "credentials")
# The query of a token request made with the account's credentials keeps only these (and its scopes).
TOKEN_QUERY = ("service", "client_id", "account")


@dataclass
class Settings:
    tag_freshness: int | None = None
    credentials: str | None = None  # USER:SECRET

    @property
    def basic(self) -> str:
        assert self.credentials
        return "Basic " + base64.b64encode(self.credentials.encode()).decode()


def parse(entry: str) -> tuple[str, Settings]:
    """One `registry_settings` entry; raises ValueError with a message for the operator."""
    host, _, spec = entry.strip().partition(":")
    host = host.lower()
    if not host or any(c in host for c in "/ ="):
        raise ValueError(f"{entry!r} does not start with a registry host (write e.g. ghcr.io:tag_freshness=300)")
    settings = Settings()
    for item in filter(None, spec.split(",")):
        key, equals, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or key not in KEYS:
            raise ValueError(f"{host}: {item!r} is not one of {', '.join(k + '=...' for k in KEYS)}")
        if key == "tag_freshness":
            if not value.isdigit():
                raise ValueError(f"{host}: tag_freshness must be a number of seconds, not {value!r}")
            settings.tag_freshness = int(value)
        else:
            settings.credentials = read_credentials(host, value)
    return host, settings


def read_credentials(host: str, source: str) -> str:
    """USER:SECRET from `@FILE` or `env:NAME`; a ValueError's text starts with `host`."""
    if source.startswith("@"):
        try:
            text = Path(source[1:]).expanduser().read_text().strip()
        except OSError as e:
            raise ValueError(f"{host}: cannot read credentials from {source[1:]}: {e.strerror or e}")
    elif source.startswith("env:"):
        text = os.environ.get(source[4:], "").strip()
        if not text:
            raise ValueError(f"{host}: the environment variable {source[4:]} is not set")
    else:
        raise ValueError(f"{host}: credentials must be @FILE or env:NAME (holding USER:SECRET), not given inline")
    if ":" not in text or text.startswith(":"):
        raise ValueError(f"{host}: credentials must be USER:SECRET")
    return text


class UpstreamCredentials:
    """Presents the credentials of `registry_settings` upstream, for clients that bring none.

    Only on pulls (GET and HEAD), only where the request verifiably goes to the registry itself
    (`Interception.destination`) or to the token realm its own verified 401 named, and a token
    request made with them asks for `pull` of repositories and nothing else: no push, no delete,
    no catalog, no refresh token."""

    def __init__(self, hosts: Interception):
        self.hosts = hosts
        self._realms: dict[tuple[str, int, str], str] = {}  # token realm (host, port, path) -> registry
        self._basic: set[str] = set()  # registries that asked for Basic on their API

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # hubcache's own requests copy a client's headers, except the anonymous probe of a
        # repository's visibility (access.py), which must stay anonymous.
        request = flow.request
        if flow.response or "authorization" in request.headers or upstream.is_subrequest(flow):
            return
        host = self.hosts.destination(flow)
        if host is None or request.method not in ("GET", "HEAD"):
            return
        registry = self._realms.get((host, request.port, request.path.partition("?")[0]))
        if registry is not None:
            scopes = pull_scopes(request.query.get_all("scope"))
            if not scopes:
                return  # a login check or a catalog: nothing the account needs to be for
            request.query = [(k, v) for k, v in request.query.items(multi=True) if k in TOKEN_QUERY] + [
                ("scope", scope) for scope in scopes
            ]
        elif host in self._basic:
            registry = host
        own = self.hosts.settings.get(registry or "")
        if own and own.credentials:
            request.headers["authorization"] = own.basic

    def response(self, flow: http.HTTPFlow) -> None:
        """Learn where a configured registry sends clients for tokens, and whether it wants Basic."""
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
            self._realms[(realm.hostname.lower(), port, realm.path or "/")] = host
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
