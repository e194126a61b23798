"""Generated bad input (hypothesis): the router, the request hook and the store answer every request
with a registry error or a pass, never crash, and never write outside the cache folder. The router
is checked against the distribution spec's grammar written out here (not registry/protocol.py's), and every
answer against the one the request calls for."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils

from hubcache.registry import protocol
from hubcache.registry.protocol import BadRequest, Kind, Route, digest_of
from hubcache.storage.store import Store
from hubcache.upstream import client as upstream
from support.addons import CacheAddons

HUB = "registry-1.docker.io"

# The distribution spec's grammar (docs/spec/api.md), and the digests hubcache can verify.
SPEC_NAME = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
SPEC_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
VERIFIABLE_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
DOCKER_HUB_NAMES = {"registry-1.docker.io": "docker.io", "index.docker.io": "docker.io"}
# RFC 6838's restricted-name, for a type and a subtype.
MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
KINDS = {"manifests": Kind.MANIFEST, "blobs": Kind.BLOB, "referrers": Kind.REFERRERS}


def expected_route(host: str, path: str) -> Route | tuple[int, str]:
    """What a request for `path` on `host` asks for, or the (status, code) of the error it gets:
    /v2/<name>/manifests/<tag or digest>, /v2/<name>/blobs/<digest>, /v2/<name>/referrers/<digest>,
    the /v2/ ping; anything else (uploads, tags lists, the catalog, other paths) is not the
    cache's business. Only one spelling of each is taken: a target with a fragment, percent-encoding,
    a backslash, empty or dot segments is refused whatever it asks, and a pull endpoint takes no
    query but containerd's `ns` naming its own registry (and the referrers' `artifactType`)."""
    registry = DOCKER_HUB_NAMES.get(host, host)
    target, question, query = path.partition("?")
    segments = target.split("/")
    unclean = any(c in target for c in "#%\\") or "" in segments[1:-1] or any(s in (".", "..") for s in segments)
    if not target.startswith("/") or unclean:
        return 400, "NAME_INVALID"
    if target in ("/v2", "/v2/"):
        route = Route(Kind.PING, registry)
    else:
        segments = target.split("/")[2:] if target.startswith("/v2/") else []
        if len(segments) < 3 or segments[-2] not in KINDS:
            return Route(Kind.OTHER, registry)
        name, kind, reference = "/".join(segments[:-2]), segments[-2], segments[-1]
        if kind == "blobs" and reference == "uploads":
            return Route(Kind.OTHER, registry)  # the upload endpoint, without its trailing slash
        if not SPEC_NAME.fullmatch(name) or len(name) > 255:
            return 400, "NAME_INVALID"
        if kind != "manifests" or ":" in reference:
            if not VERIFIABLE_DIGEST.fullmatch(reference):
                return 400, "DIGEST_INVALID"
        elif not SPEC_TAG.fullmatch(reference):
            return 400, "MANIFEST_INVALID"
        route = Route(KINDS[kind], registry, name, reference)
    if not question or not query:
        return route
    if query.count("&") >= 4:
        return 400, "UNSUPPORTED"
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return 400, "UNSUPPORTED"
    keys = [k for k, _ in pairs]
    for key, value in pairs:
        ns = key == "ns" and DOCKER_HUB_NAMES.get(value.lower(), value.lower()) == registry
        filter_ = key == "artifactType" and route.kind is Kind.REFERRERS and MEDIA_TYPE.fullmatch(value) is not None
        if keys.count(key) > 1 or not (ns or filter_):
            return 400, "UNSUPPORTED"
    return route


# Pieces that real clients and attackers put in registry paths.
segment = st.one_of(
    st.sampled_from(["library", "alpine", "..", ".", "", "a" * 300, "UPPER", "a__b", "a--b", "%2e%2e", "v2", "blobs", "manifests", "uploads"]),
    st.text(min_size=1, max_size=20),
)
reference = st.one_of(
    st.sampled_from(["latest", "sha256:" + "a" * 64, "sha256:" + "a" * 63, "sha512:" + "b" * 128, "md5:" + "c" * 32, "sha256:", ":", "-bad"]),
    st.text(max_size=80),
)
queries = st.sampled_from(
    ["", "?", "?ns=docker.io", "?ns=ghcr.io", "?ns=docker.io&ns=docker.io", "?artifactType=application/vnd.dev.sig%2Bjson", "?artifactType=x", "?x=1", "?a&b", "?#"]
)
paths = st.one_of(
    st.builds(
        lambda names, kind, ref, query: "/v2/" + "/".join(names) + f"/{kind}/" + ref + query,
        st.lists(segment, min_size=0, max_size=4),
        st.sampled_from(["manifests", "blobs", "referrers", "tags", "blobs/uploads"]),
        reference,
        queries,
    ),
    st.text(max_size=120).map(lambda t: "/" + t),
    st.sampled_from(["/v2", "/v2/", "/", "/v2//", "/v2/_catalog"]),
)
methods = st.sampled_from(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"])
ranges = st.one_of(
    st.none(),
    st.sampled_from(["bytes=0-", "bytes=-1", "bytes=5-2", "bytes=99999999999999999999-", "bytes=0-1,3-4", "chars=0-1", "bytes=--"]),
    st.text(max_size=40),
)


@given(host=st.sampled_from([HUB, "index.docker.io", "ghcr.io"]), path=paths)
@settings(max_examples=3000, deadline=None)
def test_the_router_classifies_or_refuses(host, path):
    try:
        route: Route | tuple[int, str] = protocol.parse_route(host, path)
    except BadRequest as e:
        route = (e.code.status, e.code.code)
    assert route == expected_route(host, path)


def test_a_repository_named_blobs_has_its_blobs_routed():
    digest = "sha256:" + "a" * 64
    assert protocol.parse_route(HUB, f"/v2/myorg/blobs/blobs/{digest}") == Route(Kind.BLOB, "docker.io", "myorg/blobs", digest)


@given(header=ranges, size=st.integers(min_value=0, max_value=2**40))
@settings(max_examples=2000, deadline=None)
def test_ranges_are_satisfied_or_refused(header, size):
    try:
        span = protocol.parse_range(header, size)
    except BadRequest as e:
        assert e.code.status == 416
        return
    if span is not None:
        first, last = span
        assert 0 <= first <= last < size


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture(scope="module")
def proxy_env(tmp_path_factory):
    """The cache addon on a real store, offline or with an upstream that refuses everything."""
    root = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()

    class Refusing(upstream.Upstream):
        async def send(self, *args, **kwargs) -> http.Response:
            return self.refusal()

        async def run(self, *args, **kwargs) -> http.Response:
            return self.refusal()

        @staticmethod
        def refusal() -> http.Response:
            body = protocol.error_body(protocol.ErrorCode.NAME_UNKNOWN, "the fuzzing upstream knows nothing")
            return http.Response.make(404, body, {"Content-Type": "application/json"})

    addons = CacheAddons(upstream=Refusing())
    with taddons.context(Proxyserver(), *addons.addons()) as tctx:
        tctx.options.update(cache_dir=str(root / "cache"))
        yield loop, tctx, addons, root
        addons.folder.done()
    loop.close()


def expected_answer(method: str, path: str, offline: bool) -> tuple[int | None, set[str]]:
    """The status and the possible error codes of hubcache's answer (None: no answer, the request
    goes upstream untouched), with an upstream that answers everything 404 NAME_UNKNOWN."""
    route = expected_route(HUB, path)
    if isinstance(route, tuple):
        return route[0], {route[1]}
    if offline and (route.kind is Kind.OTHER or method not in ("GET", "HEAD")):
        return 405, {"UNSUPPORTED"}
    if method not in ("GET", "HEAD") or route.kind is Kind.OTHER:
        return None, set()
    if route.kind is Kind.PING:
        return (200, set()) if offline else (404, {"NAME_UNKNOWN"})  # relayed, or answered offline
    unknown = "BLOB_UNKNOWN" if route.kind is Kind.BLOB else "MANIFEST_UNKNOWN"
    # Online: upstream's own 404, or hubcache's while it remembers that 404 (negative caching).
    return 404, {unknown} if offline else {unknown, "NAME_UNKNOWN"}


def error_code(response: http.Response, method: str) -> str | None:
    """The code of a registry error answer; None for a HEAD that carries no body, which still
    announces one."""
    assert response.headers["content-type"].startswith("application/json")
    if method == "HEAD" and not response.content:
        assert int(response.headers["content-length"]) > 0
        return None
    [error] = json.loads(response.content)["errors"]
    assert isinstance(error["message"], str) and error["message"]
    return error["code"]


@given(method=methods, path=paths, range_header=ranges, big_header=st.integers(0, 64 * 1024), offline=st.booleans())
@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_request_gets_a_registry_answer_or_passes(proxy_env, method, path, range_header, big_header, offline):
    loop, tctx, addons, root = proxy_env
    tctx.options.update(offline=offline)
    headers = {"X-Padding": "x" * big_header}
    if range_header is not None:
        headers["Range"] = range_header
    try:
        req = tutils.treq(host=HUB, port=443, scheme=b"https", method=method.encode(), path=path.encode("utf-8", "surrogateescape"), headers=http.Headers(**headers), content=b"")
    except (ValueError, UnicodeEncodeError):
        return  # not an HTTP request mitmproxy would build
    f = tflow.tflow(req=req)
    f.client_conn.sni = HUB  # the client's TLS, intercepted for the registry it goes to
    loop.run_until_complete(addons.request(f))
    while addons.fills.tasks:
        loop.run_until_complete(asyncio.gather(*addons.fills.tasks))
    status, codes = expected_answer(method, path, offline)
    route = expected_route(HUB, path)
    assert (f.response.status_code if f.response else None) == status, (method, path, offline)
    if f.response is not None and codes:
        code = error_code(f.response, method)
        assert code is None or code in codes, (method, path, offline, code)
        if offline and status == 404 and code is not None and isinstance(route, Route) and route.kind in (Kind.MANIFEST, Kind.BLOB):
            assert "not in the offline cache" in json.loads(f.response.content)["errors"][0]["message"]
    assert all(p.is_relative_to(root / "cache") for p in files_under(root)), "nothing outside the cache folder"


digests = st.one_of(st.binary(max_size=300).map(digest_of), st.sampled_from(["sha256:" + "0" * 64, "sha512:" + "1" * 128]))


@given(claimed=digests, chunks=st.lists(st.binary(max_size=5000), max_size=5))
@settings(max_examples=500, deadline=None)
def test_the_store_keeps_only_bytes_that_match(tmp_path_factory, claimed, chunks):
    root = tmp_path_factory.mktemp("store")
    store = Store(root / "cache")
    try:
        writer = store.blob_writer(claimed)
        for chunk in chunks:
            writer.write(chunk)
        data = b"".join(chunks)
        matches = digest_of(data, claimed.partition(":")[0]) == claimed
        try:
            writer.commit()
            assert matches
        except ValueError:
            assert not matches
        blob = store.open_blob(claimed)
        assert (blob is not None) == matches
        if blob:
            with blob:
                assert blob.read() == data
        assert not [p for p in (root / "cache" / "tmp").rglob("fill-*")], "no temporary file stays"
        assert all(p.is_relative_to(root / "cache") for p in files_under(root))
    finally:
        store.close()
