"""hubcache's own requests upstream (addon/upstream.py): which redirects they follow, and with what."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from hubcache.upstream import client as upstream

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
