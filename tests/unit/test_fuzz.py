"""Generated bad input (hypothesis): the router, the request hook and the store answer every request
with a registry error or a pass, never crash, and never write outside the cache folder."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils

from hubcache import protocol, upstream
from hubcache.protocol import BadRequest, Kind, digest_of
from hubcache.store import Store
from support.addons import CacheAddons

HUB = "registry-1.docker.io"
REGISTRY_STATUSES = {400, 401, 404, 405, 416, 503}

# Pieces that real clients and attackers put in registry paths.
segment = st.one_of(
    st.sampled_from(["library", "alpine", "..", ".", "", "a" * 300, "UPPER", "a__b", "a--b", "%2e%2e", "v2", "blobs", "manifests", "uploads"]),
    st.text(min_size=1, max_size=20),
)
reference = st.one_of(
    st.sampled_from(["latest", "sha256:" + "a" * 64, "sha256:" + "a" * 63, "sha512:" + "b" * 128, "md5:" + "c" * 32, "sha256:", ":", "-bad"]),
    st.text(max_size=80),
)
paths = st.one_of(
    st.builds(
        lambda names, kind, ref: "/v2/" + "/".join(names) + f"/{kind}/" + ref,
        st.lists(segment, min_size=0, max_size=4),
        st.sampled_from(["manifests", "blobs", "tags", "blobs/uploads"]),
        reference,
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
        route = protocol.parse_route(host, path)
    except BadRequest as e:
        assert e.status == 400 and e.code in ("NAME_INVALID", "DIGEST_INVALID", "MANIFEST_INVALID")
        return
    assert route.kind in Kind
    if route.kind in (Kind.MANIFEST, Kind.BLOB):
        assert protocol.NAME_RE.fullmatch(route.name) and ".." not in route.name


@given(header=ranges, size=st.integers(min_value=0, max_value=2**40))
@settings(max_examples=2000, deadline=None)
def test_ranges_are_satisfied_or_refused(header, size):
    try:
        span = protocol.parse_range(header, size)
    except BadRequest as e:
        assert e.status == 416
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
            body = protocol.error_body("NAME_UNKNOWN", "the fuzzing upstream knows nothing")
            return http.Response.make(404, body, {"Content-Type": "application/json"})

    addons = CacheAddons(upstream=Refusing())
    with taddons.context(Proxyserver(), *addons.addons()) as tctx:
        tctx.options.update(cache_dir=str(root / "cache"))
        yield loop, tctx, addons, root
        addons.folder.done()
    loop.close()


@given(method=methods, path=paths, range_header=ranges, big_header=st.integers(0, 64 * 1024), offline=st.booleans())
@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_request_gets_a_registry_answer_or_passes(proxy_env, method, path, range_header, big_header, offline):
    loop, tctx, addons, root = proxy_env
    cache = addons.cache
    tctx.options.update(offline=offline)
    headers = {"X-Padding": "x" * big_header}
    if range_header is not None:
        headers["Range"] = range_header
    try:
        req = tutils.treq(host=HUB, port=443, scheme=b"https", method=method.encode(), path=path.encode("utf-8", "surrogateescape"), headers=http.Headers(**headers), content=b"")
    except (ValueError, UnicodeEncodeError):
        return  # not an HTTP request mitmproxy would build
    f = tflow.tflow(req=req)
    loop.run_until_complete(cache.request(f))
    while addons.blobs.tasks:
        loop.run_until_complete(asyncio.gather(*addons.blobs.tasks))
    if f.response is not None and f.response.status_code not in (200, 307):
        assert f.response.status_code in REGISTRY_STATUSES | {404}, (method, path, f.response.status_code)
        body = json.loads(f.response.content) if method != "HEAD" else {"errors": [1]}
        assert body["errors"], (method, path)
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
