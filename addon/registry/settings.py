"""The registries hubcache caches out of the box, and per-registry settings (option
`registry_settings`, declared in `proxy.interception`): `tag_freshness`, and the credentials
hubcache presents upstream (read from `@FILE` or `env:NAME`, never inline; presented by
`proxy.credentials`)."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

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
            raise ValueError(f"{host}: cannot read credentials from {source[1:]}: {e.strerror or e}") from e
    elif source.startswith("env:"):
        text = os.environ.get(source[4:], "").strip()
        if not text:
            raise ValueError(f"{host}: the environment variable {source[4:]} is not set")
    else:
        raise ValueError(f"{host}: credentials must be @FILE or env:NAME (holding USER:SECRET), not given inline")
    if ":" not in text or text.startswith(":"):
        raise ValueError(f"{host}: credentials must be USER:SECRET")
    return text
