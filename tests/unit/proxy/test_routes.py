"""Routes (addon/routes.py): a registry request parsed once, before any other addon acts on it."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.io import io as flowio
from mitmproxy.net.http import http1
from mitmproxy.test import taddons, tflow, tutils

from hubcache.proxy.interception import Interception
from hubcache.proxy.routes import Routes, route_of
from hubcache.registry import protocol
from hubcache.registry.protocol import Kind, Route

HUB = "registry-1.docker.io"
DIGEST = "sha256:" + "a" * 64


def flow(path: str, host: str = HUB, sni: str | None = HUB) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", path=path.encode(), content=b""))
    f.client_conn.sni = sni
    return f


@pytest.fixture
def routes():
    hosts = Interception()
    addon = Routes(hosts)
    with taddons.context(hosts, addon):
        yield addon


def test_a_registry_request_is_noted_with_its_route_and_its_target_rebuilt(routes):
    f = flow(f"/v2/library/alpine/referrers/{DIGEST}?ns=docker.io&artifactType=application%2Fvnd.dev.sig%2Bjson")
    routes.requestheaders(f)
    assert f.response is None
    assert route_of(f) == Route(Kind.REFERRERS, "docker.io", "library/alpine", DIGEST)
    assert route_of(f).artifact_type == "application/vnd.dev.sig+json"
    assert f.request.path == f"/v2/library/alpine/referrers/{DIGEST}?artifactType=application%2Fvnd.dev.sig%2Bjson"


@pytest.mark.parametrize("path", ["/v2/library/alpine/manifests/3.20#/../../python/manifests/3", "/v2/library/%61lpine/manifests/1", "/v2/library/alpine/tags/list/.."])
def test_an_unclean_target_is_answered_400_and_noted_as_nothing(routes, path):
    f = flow(path)
    routes.requestheaders(f)
    assert f.response.status_code == 400
    assert json.loads(f.response.content)["errors"][0]["code"] == "NAME_INVALID"
    assert route_of(f) is None


def test_a_request_that_is_not_verifiably_a_registrys_is_left_alone(routes):
    f = flow("/v2/library/alpine/manifests/1#x", sni="example.com")  # TLS to another name
    routes.requestheaders(f)
    assert f.response is None and route_of(f) is None and f.request.path.endswith("#x")


def test_a_pass_through_keeps_its_path(routes):
    f = flow("/v2/library/alpine/blobs/uploads/1234?_state=abc")
    routes.requestheaders(f)
    assert route_of(f) == Route(Kind.OTHER, "docker.io") and f.request.path == "/v2/library/alpine/blobs/uploads/1234?_state=abc"


def test_a_routed_flow_can_still_be_saved_by_mitmproxy(routes):
    f = flow(f"/v2/library/alpine/manifests/{DIGEST}")
    routes.requestheaders(f)
    saved = io.BytesIO()
    flowio.FlowWriter(saved).add(f)
    [loaded] = flowio.FlowReader(io.BytesIO(saved.getvalue())).stream()
    assert route_of(loaded) == route_of(f)


# Where hubcache's parser meets mitmproxy's: the target Routes judges must be, byte for byte, the
# one the client sent and the one mitmproxy would forward. mitmproxy must not clean or decode it.
targets = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=120).map(lambda t: "/" + t)


@given(target=targets)
@settings(max_examples=1500, deadline=None)
def test_mitmproxy_reads_the_request_target_as_sent(target):
    origin = http1.read_request_head([f"GET {target} HTTP/1.1\r\n".encode(), f"Host: {HUB}\r\n".encode()])
    assert origin.path == target
    try:
        absolute = http1.read_request_head([f"GET https://{HUB}{target} HTTP/1.1\r\n".encode(), f"Host: {HUB}\r\n".encode()])
    except ValueError:
        return  # not a request mitmproxy takes: it never reaches an addon
    assert (absolute.host, absolute.port, absolute.path) == (HUB, 443, target)
    try:
        route = protocol.parse_route(HUB, target)
    except protocol.BadRequest:
        return
    if route.kind is not Kind.OTHER:
        path = target.partition("?")[0]
        # The API's root is the one route with two spellings: the registry redirects `/v2` to `/v2/`.
        expected = "/v2/" if route.kind is Kind.PING and path == "/v2" else path
        assert route.target.partition("?")[0] == expected, "a clean target is its route's own"
