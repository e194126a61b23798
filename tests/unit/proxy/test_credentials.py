"""The credentials hubcache presents upstream for a registry (`registry_settings` credentials=):
given only to the registry's own hosts and token realms, for pulls."""

from __future__ import annotations

import base64

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from hubcache.mitm.flows import Mark
from hubcache.proxy.credentials import TokenRealms, UpstreamCredentials
from hubcache.proxy.interception import Interception
from hubcache.proxy.routes import Routes

BASIC = "Basic " + base64.b64encode(b"bot:t0ken").decode()


def flow(url: str, headers: dict | None = None, method: str = "GET") -> http.HTTPFlow:
    """A request in TLS that hubcache intercepted for the URL's host (SNI and Host agree)."""
    f = tflow.tflow()
    f.request.url = url
    f.request.method = method
    f.request.headers.clear()
    f.request.headers.update(headers or {})
    f.client_conn.sni = f.request.host
    return f


def challenged(credentials: UpstreamCredentials, url: str, challenge: str) -> None:
    f = flow(url)
    f.response = tutils.tresp(status_code=401, headers=http.Headers(www_authenticate=challenge))
    credentials.responseheaders(f)


class AfterRoutes:
    """The credentials addon as mitmproxy runs it: after Routes parsed the request."""

    def __init__(self, routes: Routes, credentials: UpstreamCredentials) -> None:
        self.routes, self.credentials = routes, credentials

    def requestheaders(self, f: http.HTTPFlow) -> None:
        self.routes.requestheaders(f)
        self.credentials.requestheaders(f)

    def __getattr__(self, name: str) -> object:
        return getattr(self.credentials, name)


class TestUpstreamCredentials:
    @pytest.fixture
    def credentials(self, secret_file):
        hosts = Interception()
        credentials = UpstreamCredentials(hosts, TokenRealms())
        routes = Routes(hosts)
        with taddons.context(hosts, routes, credentials) as tctx:
            tctx.configure(hosts, registry_settings=[f"ghcr.io:credentials=@{secret_file}", "quay.io:tag_freshness=5"])
            yield AfterRoutes(routes, credentials)

    def test_token_requests_to_the_realm_carry_them(self, credentials):
        token_url = "https://ghcr.io/token?scope=repository:org/app:pull&service=ghcr.io"
        before = flow(token_url)
        credentials.requestheaders(before)
        assert "authorization" not in before.request.headers, "no realm learned yet"
        challenged(credentials, "https://ghcr.io/v2/", 'Bearer realm="https://ghcr.io/token",service="ghcr.io"')
        f = flow(token_url)
        credentials.requestheaders(f)
        assert f.request.headers["authorization"] == BASIC

    def test_a_token_asked_with_them_is_for_pull_only(self, credentials):
        challenged(credentials, "https://ghcr.io/v2/", 'Bearer realm="https://ghcr.io/token",service="ghcr.io"')
        f = flow(
            "https://ghcr.io/token?service=ghcr.io&scope=repository:org/app:pull,push,delete"
            "&scope=registry:catalog:*&scope=repository:org/b:*&offline_token=true&account=x"
        )
        credentials.requestheaders(f)
        assert f.request.headers["authorization"] == BASIC
        assert f.request.query.get_all("scope") == ["repository:org/app:pull", "repository:org/b:pull"]
        assert "offline_token" not in f.request.query and f.request.query["account"] == "x"
        catalog = flow("https://ghcr.io/token?service=ghcr.io&scope=registry:catalog:*")
        credentials.requestheaders(catalog)
        assert "authorization" not in catalog.request.headers, "nothing the account would pull"

    @pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
    def test_never_on_anything_but_a_pull(self, credentials, method):
        challenged(credentials, "https://ghcr.io/v2/", 'Basic realm="registry"')
        challenged(credentials, "https://ghcr.io/v2/", 'Bearer realm="https://ghcr.io/token"')
        for url in ("https://ghcr.io/v2/org/app/blobs/uploads/", "https://ghcr.io/token?scope=repository:org/app:push"):
            f = flow(url, method=method)
            credentials.requestheaders(f)
            assert "authorization" not in f.request.headers, (method, url)

    def test_never_where_the_names_disagree(self, credentials):
        """Learned and presented only on verified traffic of the registry: never for a request
        that claims the registry in Host (or SNI) while it goes elsewhere, or in plain HTTP."""
        spoofed = flow("http://127.0.0.1:8099/v2/")
        spoofed.request.headers["Host"] = "ghcr.io"
        spoofed.response = tutils.tresp(status_code=401, headers=http.Headers(www_authenticate='Basic realm="x"'))
        credentials.responseheaders(spoofed)
        genuine = flow("https://ghcr.io/v2/org/app/manifests/1")
        credentials.requestheaders(genuine)
        assert "authorization" not in genuine.request.headers, "a spoofed 401 taught nothing"

        challenged(credentials, "https://ghcr.io/v2/", 'Basic realm="registry"')
        for variant in ("host", "sni", "http"):
            f = flow("https://ghcr.io/v2/org/app/manifests/1")
            if variant == "host":
                f.request.headers["Host"] = "ghcr.io.evil.test"
            elif variant == "sni":
                f.client_conn.sni = "evil.test"
            else:
                f.request.scheme = "http"
            credentials.requestheaders(f)
            assert "authorization" not in f.request.headers, variant

    def test_a_realm_named_over_plain_http_is_not_learned(self, credentials):
        challenged(credentials, "https://ghcr.io/v2/", 'Bearer realm="http://ghcr.io/token"')
        f = flow("https://ghcr.io/token?service=ghcr.io&scope=repository:org/app:pull")
        credentials.requestheaders(f)
        assert "authorization" not in f.request.headers, "the account goes only to a realm named over https"

    def test_a_client_with_its_own_credentials_keeps_them(self, credentials):
        challenged(credentials, "https://ghcr.io/v2/", 'Bearer realm="https://ghcr.io/token"')
        f = flow("https://ghcr.io/token?scope=repository:org/app:pull", {"Authorization": "Basic b3duOnVzZXI="})
        credentials.requestheaders(f)
        assert f.request.headers["authorization"] == "Basic b3duOnVzZXI="

    @pytest.mark.parametrize(
        "challenge, url",
        [
            ('Bearer realm="https://ghcr.io/token"', "https://ghcr.io/token?service=ghcr.io&scope=repository:org/app:pull"),
            ('Basic realm="registry"', "https://ghcr.io/v2/org/app/manifests/1"),
        ],
    )
    def test_the_anonymous_probe_stays_anonymous(self, credentials, challenge, url):
        challenged(credentials, "https://ghcr.io/v2/", challenge)
        pull = flow(url)
        credentials.requestheaders(pull)
        assert pull.request.headers["authorization"] == BASIC, "a client's pull gets the account"
        probe = flow(url)
        probe.metadata[Mark.SUBREQUEST] = True
        credentials.requestheaders(probe)
        assert "authorization" not in probe.request.headers

    def test_a_registry_asking_for_basic_gets_it_on_its_api(self, credentials):
        challenged(credentials, "https://ghcr.io/v2/", 'Basic realm="registry"')
        f = flow("https://ghcr.io/v2/org/app/manifests/1")
        credentials.requestheaders(f)
        assert f.request.headers["authorization"] == BASIC

    @pytest.mark.parametrize(
        "path", ["/v2/", "/v2/_catalog", "/v2/_catalog?n=1000", "/v2/org/app/tags/list", "/v2/org/app/blobs/uploads/", "/v2/Org/app/manifests/1"]
    )
    def test_basic_goes_to_pull_endpoints_only(self, credentials, path):
        challenged(credentials, "https://ghcr.io/v2/", 'Basic realm="registry"')
        f = flow(f"https://ghcr.io{path}")
        credentials.requestheaders(f)
        assert "authorization" not in f.request.headers, "a catalog or tag list would list what the account sees"
        for pull in ("/v2/org/app/manifests/1", f"/v2/org/app/blobs/sha256:{'a' * 64}", f"/v2/org/app/referrers/sha256:{'a' * 64}"):
            f = flow(f"https://ghcr.io{pull}", method="HEAD")
            credentials.requestheaders(f)
            assert f.request.headers["authorization"] == BASIC, pull

    def test_registries_without_credentials_and_other_realms_get_nothing(self, credentials):
        challenged(credentials, "https://quay.io/v2/", 'Bearer realm="https://quay.io/v2/auth"')
        challenged(credentials, "https://example.com/v2/", 'Bearer realm="https://example.com/token"')
        for url in ("https://quay.io/v2/auth?scope=x", "https://example.com/token?scope=x"):
            f = flow(url)
            credentials.requestheaders(f)
            assert "authorization" not in f.request.headers, url
