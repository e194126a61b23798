"""skopeo pulls through a real hubcache process from a real distribution registry (TLS, loopback)."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl

import pytest

from hubcache.storage.store import Store
from support import proxied
from support.clients import pull, pulled_blobs, skopeo_copy
from support.images import build_image
from support.registry import REGISTRY_NAME


@pytest.mark.parametrize("blob_urls", ["loopback", "https"])
def test_cold_pull_fills_and_warm_pull_downloads_nothing(hubcache, registry, multi_image, tmp_path, blob_urls):
    ref = f"{REGISTRY_NAME}/test/multi:1"
    amd64 = multi_image.platform("linux/amd64")
    proxy = hubcache(blob_urls=blob_urls)

    pull(proxy, ref, tmp_path / "cold")
    assert pulled_blobs(tmp_path / "cold") == {amd64.config.digest, *(layer.digest for layer in amd64.layers)}
    registry.settle()
    assert len(registry.blob_gets()) == 1 + len(amd64.layers)
    filled = {(e["kind"], e["digest"]) for e in proxy.journal() if e["outcome"] == "filled"}
    assert ("blob", amd64.layers[0].digest) in filled
    assert ("manifest", multi_image.index_digest) in filled
    assert ("manifest", amd64.manifest.digest) in filled

    # Another engine, another proxy process on the same store.
    proxy.stop()
    registry.reset_requests()
    proxy = hubcache(blob_urls=blob_urls)
    pull(proxy, ref, tmp_path / "warm")
    registry.settle()
    assert pulled_blobs(tmp_path / "warm") == pulled_blobs(tmp_path / "cold")
    assert registry.blob_gets() == []
    assert registry.manifest_gets() == []
    assert [r.method for r in registry.requests() if r.is_manifest] == ["HEAD"]


def test_all_platforms_are_cached(hubcache, registry, multi_image, tmp_path):
    ref = f"{REGISTRY_NAME}/test/multi:1"
    proxy = hubcache()
    pull(proxy, ref, tmp_path / "cold", all_platforms=True)
    registry.reset_requests()
    pull(proxy, ref, tmp_path / "warm", all_platforms=True)
    registry.settle()
    every_blob = {b.digest for p in multi_image.platforms for b in [p.config, *p.layers]}
    assert every_blob <= pulled_blobs(tmp_path / "warm")
    assert registry.blob_gets() == [] and registry.manifest_gets() == []


def test_a_cached_blob_cut_short_on_disk_is_fetched_again_not_served(hubcache, registry, multi_image, tmp_path):
    """A machine that lost power before its disk had a blob's data leaves its file short under an
    entry that says it verified: the next pull gets the blob whole, from upstream, once."""
    ref = f"{REGISTRY_NAME}/test/multi:1"
    layer = multi_image.platform("linux/amd64").layers[0].digest
    proxy = hubcache()
    pull(proxy, ref, tmp_path / "cold")
    proxy.journal()  # every fill committed
    store = Store(proxy.cache_dir)
    with store.open_blob(layer) as blob:
        os.truncate(blob.name, os.fstat(blob.fileno()).st_size // 2)
    store.close()
    registry.settle()
    registry.reset_requests()

    pull(proxy, ref, tmp_path / "after")
    assert pulled_blobs(tmp_path / "after") == pulled_blobs(tmp_path / "cold")  # each checked against its digest
    registry.settle()
    assert [r.reference for r in registry.blob_gets()] == [layer]
    assert f"blob {layer} is" in proxy.log_text()
    registry.reset_requests()
    pull(proxy, ref, tmp_path / "again")
    registry.settle()
    assert registry.blob_gets() == []


def test_a_small_blob_is_answered_by_the_proxy_hashed_again_and_a_changed_one_fetched_again(hubcache, registry, multi_image, tmp_path):
    """An image's config (a few hundred bytes) comes in the proxy's answer, no 307, so a client on
    another machine saves a connection; its bytes are hashed on every answer, so a changed file is
    never sent, even one that kept its size."""
    ref = f"{REGISTRY_NAME}/test/multi:1"
    amd64 = multi_image.platform("linux/amd64")
    config, layer = amd64.config.digest, amd64.layers[0].digest
    proxy = hubcache()
    pull(proxy, ref, tmp_path / "cold")
    proxy.journal()  # every fill committed
    small = proxied.request(proxy.port, REGISTRY_NAME, f"/v2/test/multi/blobs/{config}", ca=proxy.ca_cert, follow=False)
    assert small.status == 200 and hashlib.sha256(small.body).hexdigest() == config.removeprefix("sha256:")
    assert small.headers["Docker-Content-Digest"] == config
    large = proxied.request(proxy.port, REGISTRY_NAME, f"/v2/test/multi/blobs/{layer}", ca=proxy.ca_cert, follow=False)
    assert large.status == 307, "a layer of 2 MB goes to the blob server"

    store = Store(proxy.cache_dir)
    with store.open_blob(config) as blob:
        name = blob.name
    store.close()
    with open(name, "r+b") as f:
        f.write(b"{ ")  # two bytes changed in place: the size it verified at is kept
    registry.settle()
    registry.reset_requests()
    pull(proxy, ref, tmp_path / "after")  # skopeo checks every blob against its digest
    assert pulled_blobs(tmp_path / "after") == pulled_blobs(tmp_path / "cold")
    registry.settle()
    assert [r.reference for r in registry.blob_gets()] == [config]
    assert f"blob {config} no longer hashes to its digest" in proxy.log_text()


def test_tag_revalidation_follows_a_moved_tag(hubcache, registry, tmp_path, layouts):
    first = build_image(layouts / "moving", "a", [100_000], seed=10)
    second = build_image(layouts / "moving", "b", [120_000], seed=11)
    registry.push(first.layout_dir, "a", "test/moving:latest")
    proxy = hubcache()
    pull(proxy, f"{REGISTRY_NAME}/test/moving:latest", tmp_path / "one")
    assert first.platforms[0].layers[0].digest in pulled_blobs(tmp_path / "one")

    registry.push(second.layout_dir, "b", "test/moving:latest")
    pull(proxy, f"{REGISTRY_NAME}/test/moving:latest", tmp_path / "two")
    assert second.platforms[0].layers[0].digest in pulled_blobs(tmp_path / "two")


def test_upstream_down_serves_the_last_known_manifest(hubcache, registry, multi_image, tmp_path):
    ref = f"{REGISTRY_NAME}/test/multi:1"
    proxy = hubcache(revalidate_timeout=3)
    pull(proxy, ref, tmp_path / "online")
    registry.stop()
    pull(proxy, ref, tmp_path / "down")
    assert pulled_blobs(tmp_path / "down") == pulled_blobs(tmp_path / "online")
    stale = [e for e in proxy.journal() if e["outcome"] == "stale"]
    assert stale and stale[0]["reference"] == "1"
    # The operator is told once that the registry is down, not once per request served anyway.
    assert proxy.log_text().count(f"hubcache: {REGISTRY_NAME} is down") == 1


def test_range_on_a_cached_blob_is_an_exact_206(hubcache, registry, multi_image, tmp_path):
    proxy = hubcache()
    pull(proxy, f"{REGISTRY_NAME}/test/multi:1", tmp_path / "fill")
    registry.settle()
    registry.reset_requests()
    layer = multi_image.platform("linux/amd64").layers[1]
    path = f"/v2/test/multi/blobs/{layer.digest}"
    whole = proxied.request(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert)
    offset = 1_234_567
    part = proxied.request(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert, headers={"Range": f"bytes={offset}-"})
    registry.settle()
    assert registry.blob_gets() == [], "both answers must come from the cache"
    assert whole.status == 200 and hashlib.sha256(whole.body).hexdigest() == layer.digest[7:]
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes {offset}-{layer.size - 1}/{layer.size}"
    assert part.body == whole.body[offset:]
    beyond = proxied.request(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert, headers={"Range": f"bytes={layer.size}-"})
    assert beyond.status == 416
    assert beyond.json()["errors"][0]["code"] == "RANGE_INVALID"


@pytest.mark.parametrize(
    "path, status, code",
    [
        ("/v2/Bad..Name/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/test/multi/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/test/multi/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"),
        ("/v2/test/multi/manifests/bad:tag:x", 400, "DIGEST_INVALID"),
    ],
)
def test_bad_requests_get_registry_errors(hubcache, registry, path, status, code):
    proxy = hubcache()
    answer = proxied.request(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert)
    assert answer.status == status
    assert answer.json()["errors"][0]["code"] == code
    assert answer.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    registry.settle()
    assert registry.requests() == []
    # and the proxy keeps serving
    assert proxied.request(proxy.port, REGISTRY_NAME, "/v2/", ca=proxy.ca_cert).status == 200


def test_pushes_pass_through_untouched(hubcache, registry, multi_image):
    proxy = hubcache()
    answer = proxied.request(
        proxy.port, REGISTRY_NAME, "/v2/test/pushed/blobs/uploads/", ca=proxy.ca_cert, method="POST"
    )
    assert answer.status == 202  # the registry itself started an upload session
    registry.settle()
    assert [(r.method, r.path) for r in registry.requests()] == [("POST", "/v2/test/pushed/blobs/uploads/")]


def test_other_hosts_are_tunnelled_not_intercepted(hubcache, registry, ca):
    """A host that is not a registry reaches its own certificate through hubcache untouched."""
    proxy = hubcache(upstream_map=[f"other.hubcache.test=127.0.0.1:{registry.port}", f"{REGISTRY_NAME}=127.0.0.1:{registry.port}"])

    def issuer_seen_through_proxy(host: str) -> str:
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        context.load_verify_locations(cafile=str(proxy.ca_cert))
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            with context.wrap_socket(raw, server_hostname=host) as tls:
                cert = tls.getpeercert()
        return dict(x[0] for x in cert["issuer"])["commonName"]

    assert "mitmproxy" not in issuer_seen_through_proxy("other.hubcache.test")
    assert "mitmproxy" in issuer_seen_through_proxy(REGISTRY_NAME)


def test_proxy_credentials_guard_everything_blobs_included(hubcache, registry, multi_image, tmp_path):
    proxy = hubcache(proxyauth="alice:s3cret", blob_urls="https")
    ref = f"docker://{REGISTRY_NAME}/test/multi:1"
    refused = skopeo_copy(ref, tmp_path / "refused", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert refused.returncode != 0 and "Proxy Authentication Required" in refused.stderr
    with_credentials = proxy.url.replace("http://", "http://alice:s3cret@")
    allowed = skopeo_copy(ref, tmp_path / "allowed", proxy=with_credentials, ca_bundle=proxy.client_bundle)
    assert allowed.returncode == 0, allowed.stderr
    assert multi_image.platform("linux/amd64").layers[0].digest in pulled_blobs(tmp_path / "allowed")


def test_a_pull_checks_the_version_upstream_once_and_a_login_every_time(hubcache, registry, multi_image, tmp_path):
    ref = f"{REGISTRY_NAME}/test/multi:1"
    proxy = hubcache()
    pull(proxy, ref, tmp_path / "first")
    assert proxied.request(proxy.port, REGISTRY_NAME, "/v2/", ca=proxy.ca_cert).status == 200  # learned now at the latest
    registry.settle()
    registry.reset_requests()

    pull(proxy, ref, tmp_path / "second")
    registry.settle()
    assert [r.path for r in registry.requests() if r.path == "/v2/"] == [], "the anonymous /v2/ check was answered again"
    assert [r.method for r in registry.requests() if r.is_manifest] == ["HEAD"]  # the tag still asks upstream

    # A login's check carries credentials: upstream judges it, every time.
    for _ in range(2):
        answer = proxied.request(proxy.port, REGISTRY_NAME, "/v2/", ca=proxy.ca_cert, headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert answer.status == 200
    registry.settle()
    assert [r.path for r in registry.requests() if r.path == "/v2/"] == ["/v2/", "/v2/"]
