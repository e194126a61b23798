"""Per-registry settings (`registry_settings`); the credentials they name are tested in proxy/test_credentials.py."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from hubcache.proxy.interception import Interception
from hubcache.registry.settings import DEFAULT_REGISTRIES, parse


def test_the_default_registries_are_cached():
    hosts = Interception()
    with taddons.context(hosts):
        for host in DEFAULT_REGISTRIES + ("auth.docker.io",):
            assert hosts.intercepts(host), host
        assert not hosts.intercepts("example.com")


def test_an_entry_is_parsed(secret_file, monkeypatch):
    host, settings = parse(f"GHCR.io:tag_freshness=300,credentials=@{secret_file}")
    assert (host, settings.tag_freshness, settings.credentials) == ("ghcr.io", 300, "bot:t0ken")
    monkeypatch.setenv("QUAY_CREDENTIALS", "robot:abc")
    assert parse("quay.io:credentials=env:QUAY_CREDENTIALS")[1].credentials == "robot:abc"
    assert parse("harbor.example.internal")[1].tag_freshness is None


@pytest.mark.parametrize(
    "entry, message",
    [
        ("ghcr.io:tag_freshness=soon", "tag_freshness must be a number of seconds"),
        ("ghcr.io:colour=blue", "is not one of tag_freshness=..., credentials=..."),
        ("ghcr.io:credentials=bot:t0ken", "credentials must be @FILE or env:NAME"),
        ("ghcr.io:credentials=@/nonexistent/file", "cannot read credentials from /nonexistent/file"),
        ("ghcr.io:credentials=env:HUBCACHE_UNSET_VARIABLE", "HUBCACHE_UNSET_VARIABLE is not set"),
        (":tag_freshness=1", "does not start with a registry host"),
    ],
)
def test_a_bad_entry_is_one_line(entry, message):
    hosts = Interception()
    with taddons.context(hosts) as tctx, pytest.raises(exceptions.OptionsError, match="registry_settings: .*" + message.replace(".", r"\.")):
        tctx.configure(hosts, registry_settings=[entry])
