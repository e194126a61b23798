"""Per-registry settings (`registry_settings`) and the credentials hubcache presents upstream."""

from __future__ import annotations

import base64

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from addon import upstream
from addon.hosts import Interception
from addon.registries import DEFAULT_REGISTRIES, UpstreamCredentials, parse

BASIC = "Basic " + base64.b64encode(b"bot:t0ken").decode()


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "ghcr.credentials"
    path.write_text("bot:t0ken\n")
    return path


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
    with taddons.context(hosts) as tctx:
        with pytest.raises(exceptions.OptionsError, match="registry_settings: .*" + message.replace(".", r"\.")):
            tctx.configure(hosts, registry_settings=[entry])


def flow(url: str, headers: dict | None = None) -> http.HTTPFlow:
    f = tflow.tflow()
    f.request.url = url
    f.request.headers.clear()
    f.request.headers.update(headers or {})
    return f


def challenged(credentials: UpstreamCredentials, url: str, challenge: str) -> None:
    f = flow(url)
    f.response = tutils.tresp(status_code=401, headers=http.Headers(www_authenticate=challenge))
    credentials.response(f)


class TestUpstreamCredentials:
    @pytest.fixture
    def credentials(self, secret_file):
        hosts = Interception()
        credentials = UpstreamCredentials(hosts)
        with taddons.context(hosts, credentials) as tctx:
            tctx.configure(hosts, registry_settings=[f"ghcr.io:credentials=@{secret_file}", "quay.io:tag_freshness=5"])
            yield credentials

    def test_token_requests_to_the_realm_carry_them(self, credentials):
        token_url = "https://ghcr.io/token?scope=repository:org/app:pull&service=ghcr.io"
        before = flow(token_url)
        credentials.requestheaders(before)
        assert "authorization" not in before.request.headers, "no realm learned yet"
        challenged(credentials, "https://ghcr.io/v2/", 'Bearer realm="https://ghcr.io/token",service="ghcr.io"')
        f = flow(token_url)
        credentials.requestheaders(f)
        assert f.request.headers["authorization"] == BASIC

    def test_a_client_with_its_own_credentials_keeps_them(self, credentials):
        challenged(credentials, "https://ghcr.io/v2/", 'Bearer realm="https://ghcr.io/token"')
        f = flow("https://ghcr.io/token?scope=x", {"Authorization": "Basic b3duOnVzZXI="})
        credentials.requestheaders(f)
        assert f.request.headers["authorization"] == "Basic b3duOnVzZXI="

    def test_the_anonymous_probe_stays_anonymous(self, credentials):
        challenged(credentials, "https://ghcr.io/v2/", 'Bearer realm="https://ghcr.io/token"')
        probe = flow("https://ghcr.io/token?scope=x")
        probe.metadata[upstream.MARK] = True
        credentials.requestheaders(probe)
        assert "authorization" not in probe.request.headers

    def test_a_registry_asking_for_basic_gets_it_on_its_api(self, credentials):
        challenged(credentials, "https://ghcr.io/v2/", 'Basic realm="registry"')
        f = flow("https://ghcr.io/v2/org/app/manifests/1")
        credentials.requestheaders(f)
        assert f.request.headers["authorization"] == BASIC

    def test_registries_without_credentials_and_other_realms_get_nothing(self, credentials):
        challenged(credentials, "https://quay.io/v2/", 'Bearer realm="https://quay.io/v2/auth"')
        challenged(credentials, "https://example.com/v2/", 'Bearer realm="https://example.com/token"')
        for url in ("https://quay.io/v2/auth?scope=x", "https://example.com/token?scope=x"):
            f = flow(url)
            credentials.requestheaders(f)
            assert "authorization" not in f.request.headers, url
