"""Two parsers meet: hubcache's (protocol.parse_route) and a distribution registry's (Debian's
docker-registry, the router Harbor, GitLab and every self-hosted registry:2 share). Generated
request targets go to both. For every target hubcache accepts as a pull, the registry, reading
the very same bytes (and following its own redirects), must answer exactly what it answers for the
route hubcache parsed: otherwise one request could be decided on as one thing and answered as
another. Targets hubcache refuses (or passes through untouched, Kind.OTHER) bind it to nothing."""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubcache.registry import protocol
from hubcache.registry.protocol import Kind
from support.images import build_image
from support.registry import REGISTRY_NAME, push

# Repositories the registry holds, and names next to them that it does not.
NAMES = ["test/multi", "test/other", "test/other/deeper", "a.b/c_d-e", "test/missing"]
TAGS = ["1", "latest", "2", "v1.0_rc-1"]
# What clients and attackers put into targets: what a registry cleans, decodes or splits on.
PIECES = ["#", "%23", "/..", "/.", "//", "/../..", "%2F", "%2f", "%2e", "%2E%2E", "%25", "?", "?ns=" + REGISTRY_NAME, "?ns=docker.io", "&", ";", "=", "\\", "%5C", ":", "@", "+", "~"]


@pytest.fixture(scope="module")
def upstream(registry, multi_image, tmp_path_factory):
    """The registry with a few repositories, and a way to ask it for raw targets."""
    other = build_image(tmp_path_factory.mktemp("other"), "1", [10_000], seed="parsers")
    push(registry, "test/other:1", other)
    push(registry, "test/other/deeper:latest", other)
    push(registry, "a.b/c_d-e:v1.0_rc-1", multi_image)
    context = ssl.create_default_context(cafile=str(registry.ca.cert_path))

    def answer(target: str, method: str = "GET") -> tuple:
        """What the registry answers for `target` sent as is, after its own redirects on its own host."""
        for _ in range(5):
            conn = http.client.HTTPSConnection("127.0.0.1", registry.port, context=context, timeout=30)
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", REGISTRY_NAME)
                conn.putheader("Accept", "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json")
                conn.endheaders()
                response = conn.getresponse()
                body = response.read()
            finally:
                conn.close()
            location = response.headers.get("Location")
            if response.status not in protocol.REDIRECTS or not location:
                return response.status, response.headers.get("Docker-Content-Digest"), _codes(body), hashlib.sha256(body).hexdigest()
            moved = urlsplit(urljoin(f"https://{REGISTRY_NAME}{target}", location))
            target = moved.path + (f"?{moved.query}" if moved.query else "")
        raise AssertionError(f"the registry redirected {target!r} too often")

    return answer, {"digest": multi_image.index_digest, "blob": multi_image.platforms[0].layers[0].digest}


def spelled(route: protocol.Route) -> str:
    """The one spelling of what hubcache parsed, written out here (not taken from registry/protocol.py)."""
    if route.kind is Kind.PING:
        return "/v2/"
    segment = {Kind.MANIFEST: "manifests", Kind.BLOB: "blobs", Kind.REFERRERS: "referrers"}[route.kind]
    return f"/v2/{route.name}/{segment}/{route.reference}"


def _codes(body: bytes) -> tuple[str, ...]:
    try:
        return tuple(e.get("code") for e in json.loads(body).get("errors", []))
    except (ValueError, AttributeError):
        return ()


def targets(known: dict[str, str]) -> st.SearchStrategy[str]:
    reference = st.one_of(st.sampled_from(TAGS), st.just(known["digest"]), st.just("sha256:" + "0" * 64))
    canonical = st.one_of(
        st.just("/v2/"),
        st.builds(lambda n, r: f"/v2/{n}/manifests/{r}", st.sampled_from(NAMES), reference),
        st.builds(lambda n: f"/v2/{n}/blobs/{known['blob']}", st.sampled_from(NAMES)),
        st.builds(lambda n: f"/v2/{n}/referrers/{known['digest']}", st.sampled_from(NAMES)),
    )

    def spliced(base: str, inserts: list[tuple[int, str]], tail: str) -> str:
        for position, piece in sorted(inserts, reverse=True):
            at = position % (len(base) + 1)
            base = base[:at] + piece + base[at:]
        return base + tail

    hidden = st.builds(lambda base, other: base + "#/../../../.." + other[3:], canonical, canonical)
    return st.one_of(
        canonical,
        hidden,
        st.builds(
            spliced,
            canonical,
            st.lists(st.tuples(st.integers(0, 200), st.sampled_from(PIECES)), max_size=3),
            st.one_of(st.just(""), st.sampled_from(PIECES), canonical.map(lambda t: t[3:])),
        ),
    )


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_every_target_hubcache_accepts_is_routed_alike_by_the_registry(upstream, method):
    answer, known = upstream
    checked = []

    @given(target=targets(known))
    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    def agree(target: str) -> None:
        try:
            route = protocol.parse_route(REGISTRY_NAME, target)
        except protocol.BadRequest:
            return  # refused: nothing is decided on it
        if route.kind is Kind.OTHER:
            return  # passed through untouched: nothing is decided on it either
        expected = answer(spelled(route), method)
        assert answer(target, method) == expected, f"{target!r} is {route} to hubcache, something else to the registry"
        checked.append(expected[0])

    agree()
    assert len(checked) >= 25, f"only {len(checked)} generated targets were accepted: the test checked too little"
    assert {200, 404} <= set(checked), f"the registry answered only {set(checked)}: it was not asked what the test means to ask"
