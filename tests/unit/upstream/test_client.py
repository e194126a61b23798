"""hubcache's own requests upstream (addon/upstream.py): which redirects they follow, and with what."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from hubcache.registry import protocol
from hubcache.upstream import client as upstream
from support.cache_env import BLOB_DIGEST, CDN, HUB, OCI_INDEX, REPO, flow, manifest_path

URL = "https://registry.example/v2/acme/app/manifests/1"


def client_flow() -> http.HTTPFlow:
    f = tflow.tflow()
    f.request = http.Request.make("GET", URL, headers={"Authorization": "Bearer for-the-registry"})
    return f


@pytest.mark.parametrize(
    "location, keeps",
    [
        ("/v2/acme/app/manifests/1", True),  # the same origin (and the same route: see test_cache's TestRedirected)
        ("https://registry.example:8443/v2/acme/app/manifests/1", False),  # another port
        ("http://registry.example/v2/acme/app/manifests/1", False),  # plain HTTP: never in the clear
        ("https://cdn.example/blob?signed=1", False),  # another host
    ],
)
def test_credentials_stay_with_the_origin_they_were_given_to(location, keeps):
    target = upstream.redirected(client_flow().request, location)
    assert ("authorization" in target.headers) is keeps, target.url


def head(like: http.HTTPFlow) -> http.Request:
    request = like.request.copy()
    request.method = "HEAD"
    return request


async def test_a_redirect_to_plain_http_is_the_answer_not_followed(monkeypatch):
    """The access check follows redirects (send with follow): only to https URLs."""
    asked: list[str] = []
    answers = [http.Response.make(307, b"", {"Location": "http://registry.example/v2/acme/app/manifests/1"}), http.Response.make(200)]

    async def run(self, flow, idle_timeout, progress=None):
        asked.append(flow.request.url)
        return answers.pop(0)

    monkeypatch.setattr(upstream.Upstream, "run", run)
    like = client_flow()
    answer = await upstream.Upstream().send(like, head(like), 5, follow=True)
    assert answer.status_code == 307 and asked == [URL]


async def test_an_https_redirect_is_followed_to_its_end(monkeypatch):
    asked: list[tuple[str, bool]] = []
    answers = [http.Response.make(307, b"", {"Location": "https://registry.example:8443/elsewhere"}), http.Response.make(200)]

    async def run(self, flow, idle_timeout, progress=None):
        asked.append((flow.request.url, "authorization" in flow.request.headers))
        return answers.pop(0)

    monkeypatch.setattr(upstream.Upstream, "run", run)
    like = client_flow()
    answer = await upstream.Upstream().send(like, head(like), 5, follow=True)
    assert answer.status_code == 200
    assert asked == [(URL, True), ("https://registry.example:8443/elsewhere", False)]


def test_request_for_builds_from_the_route_not_the_clients_target():
    """The request sent upstream names what hubcache parsed, whatever the client's flow still says."""
    f = flow(f"/v2/{REPO}/manifests/x#/../../../../library/python/manifests/3", headers={"Accept": OCI_INDEX, "X-Evil": "1", "Content-Length": "5"})
    f.request.port = 8443  # a registry named with its port
    route = protocol.Route(protocol.Kind.MANIFEST, "docker.io", REPO, "x")
    request = upstream.request_for(f, route, "HEAD")
    assert (request.method, request.url) == ("HEAD", f"https://{HUB}:8443/v2/{REPO}/manifests/x")
    assert request.host_header == f"{HUB}:8443"
    assert request.headers.get_all("accept") == [OCI_INDEX]
    assert "x-evil" not in request.headers and "content-length" not in request.headers and request.content == b""


class TestRedirected:
    """upstream.redirected: what a redirect may change."""

    def request(self, path: str = manifest_path("1")) -> http.Request:
        r = http.Request.make("GET", f"https://{HUB}{path}", headers={"Authorization": "Bearer t"})
        return r

    @pytest.mark.parametrize(
        "location",
        ["/v2/library/python/manifests/1", f"/v2/{REPO}/manifests/2", f"/v2/{REPO}/blobs/{BLOB_DIGEST}", f"https://{HUB.upper()}:8443/v2/x/manifests/1", "/v2/a/../b/manifests/1", "/v2/_catalog"],
    )
    def test_a_redirect_to_the_same_host_that_names_something_else_is_refused(self, location):
        with pytest.raises(upstream.Renamed):
            upstream.redirected(self.request(), location)

    @pytest.mark.parametrize("location", ["file:///etc/passwd", "https://[::1/x", "https://host:99999/x"])
    def test_a_redirect_to_no_url_is_refused(self, location):
        with pytest.raises(Exception) as refused:  # any: which one is what is tested
            upstream.redirected(self.request(), location)
        assert refused.type is upstream.Unfollowable and "which is no URL to follow" in str(refused.value), refused.type

    def test_a_redirect_to_the_same_route_or_a_blob_host_is_followed(self):
        same = upstream.redirected(self.request(), f"/v2/{REPO}/manifests/1")
        assert same.url == f"https://{HUB}{manifest_path('1')}" and same.headers["authorization"] == "Bearer t"
        cdn = upstream.redirected(self.request(), f"https://{CDN}/data?verify=1")
        assert cdn.host == CDN and "authorization" not in cdn.headers
