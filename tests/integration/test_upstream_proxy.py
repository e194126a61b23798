"""hubcache behind a corporate proxy (`--mode upstream:...`, a real tinyproxy on loopback): every
upstream request goes through it, the client's own and hubcache's (fills, revalidation, probes),
to the mapped addresses; blobs reach clients from hubcache's blob server, never through it; and
when it goes away, hits are still served and misses get a registry error at once."""

from __future__ import annotations

import pytest

from support import proxied
from support.clients import pull, pulled_blobs, skopeo_copy
from support.corporate import CorporateProxy
from support.registry import REGISTRY_NAME

HUB = "registry-1.docker.io"


@pytest.fixture
def corporate(registry, dockerhub, tmp_path):
    """A corporate proxy that lets CONNECTs through to the test upstreams' ports only: a CONNECT
    to a registry's real name (port 443) is refused and logged, so it cannot pass unnoticed."""
    proxy = CorporateProxy(tmp_path / "corporate", [registry.port, dockerhub.port]).start()
    yield proxy
    proxy.stop()


def blobs_of(image) -> set[str]:
    amd64 = image.platform("linux/amd64")
    return {amd64.config.digest, *(layer.digest for layer in amd64.layers)}


def behind(hubcache, corporate, **options):
    return hubcache(mode=f"upstream:{corporate.url}", **options)


def test_cold_pull_goes_through_the_corporate_proxy_and_warm_pull_is_served_from_cache(
    hubcache, registry, corporate, multi_image, tmp_path
):
    amd64 = multi_image.platform("linux/amd64")
    upstream = f"127.0.0.1:{registry.port}"
    proxy = behind(hubcache, corporate)

    pull(proxy, f"{REGISTRY_NAME}/test/multi:1", tmp_path / "cold")
    assert pulled_blobs(tmp_path / "cold") == blobs_of(multi_image)
    registry.settle()
    # Every blob was fetched by hubcache itself (a fill), and upstream saw them.
    assert len(registry.blob_gets()) == 1 + len(amd64.layers)
    connects = corporate.connects()
    assert corporate.refused_ports() == [], connects
    assert set(connects) == {upstream}, "every CONNECT names the mapped address of the registry"
    # Each request hubcache sends by itself runs on a connection of its own (a replay); the
    # client's own manifest GETs may share one. So if any fill or probe had bypassed the
    # corporate proxy, there would be fewer CONNECTs than this.
    own = [r for r in registry.requests() if not (r.method == "GET" and r.is_manifest)]
    assert len(connects) >= len(own), (connects, own)
    assert {e["digest"] for e in proxy.journal() if e["outcome"] == "filled"} >= {layer.digest for layer in amd64.layers}

    corporate.reset()
    registry.reset_requests()
    pull(proxy, f"{REGISTRY_NAME}/test/multi:1", tmp_path / "warm")
    registry.settle()
    assert pulled_blobs(tmp_path / "warm") == pulled_blobs(tmp_path / "cold")
    assert registry.blob_gets() == [] and registry.manifest_gets() == []
    assert [r.method for r in registry.requests() if r.is_manifest] == ["HEAD"]  # the tag's revalidation
    # Warm, upstream sees hubcache's own requests only (the revalidation, a /v2/ ping), each on a
    # connection of its own through the corporate proxy.
    assert corporate.connects() == [upstream] * len(registry.requests())


def test_docker_hub_token_flow_and_cdn_redirects_go_through_the_corporate_proxy(
    hubcache, dockerhub, corporate, multi_image, tmp_path
):
    amd64 = multi_image.platform("linux/amd64")
    proxy = behind(hubcache, corporate)

    pull(proxy, f"{HUB}/library/multi:1", tmp_path / "cold")
    assert pulled_blobs(tmp_path / "cold") == blobs_of(multi_image)
    # hubcache followed the registry's redirects to the CDN itself, through the corporate proxy
    # too (the CDN's name is mapped to the double like the registry's).
    assert len(dockerhub.requests(kind="cdn")) == 1 + len(amd64.layers)
    assert dockerhub.requests(kind="token"), "the token flow reached the double"
    assert corporate.refused_ports() == []
    assert set(corporate.connects()) == {f"127.0.0.1:{dockerhub.port}"}
    assert len(corporate.connects()) >= len(dockerhub.requests(kind="cdn"))

    dockerhub.reset()
    corporate.reset()
    pull(proxy, f"{HUB}/library/multi:1", tmp_path / "warm")
    assert pulled_blobs(tmp_path / "warm") == pulled_blobs(tmp_path / "cold")
    assert dockerhub.requests(kind="cdn") == [] and dockerhub.requests(kind="blob") == []
    assert [r.method for r in dockerhub.requests(kind="manifest")] == ["HEAD"]
    assert corporate.connects(), "the revalidation went through the corporate proxy"


@pytest.mark.parametrize(
    "blob_urls",
    ["loopback", "https"],
)
def test_blobs_come_from_the_blob_server_never_through_the_corporate_proxy(
    hubcache, registry, corporate, multi_image, tmp_path, blob_urls
):
    proxy = behind(hubcache, corporate, blob_urls=blob_urls)
    ref = f"{REGISTRY_NAME}/test/multi:1"
    for run in ("cold", "warm"):
        registry.reset_requests()
        corporate.reset()
        result = skopeo_copy(
            f"docker://{ref}", tmp_path / run, proxy=proxy.url, ca_bundle=proxy.client_bundle, timeout=120
        )
        # The corporate proxy saw the registry only: never hubcache's blob server, by either URL.
        assert set(corporate.connects()) <= {f"127.0.0.1:{registry.port}"}, corporate.connects()
        assert result.returncode == 0, result.stderr
    registry.settle()
    assert registry.blob_gets() == []
    assert pulled_blobs(tmp_path / "warm") == pulled_blobs(tmp_path / "cold") == blobs_of(multi_image)


def test_corporate_proxy_gone_hits_are_served_and_misses_are_answered_at_once(
    hubcache, registry, corporate, multi_image, tmp_path
):
    arm64 = multi_image.platform("linux/arm64/v8")
    proxy = behind(hubcache, corporate, revalidate_timeout=5, fill_timeout=10)
    pull(proxy, f"{REGISTRY_NAME}/test/multi:1", tmp_path / "cold")

    corporate.stop()
    registry.reset_requests()
    # A hit: the tag cannot be revalidated, so its last digest is served, and every blob.
    pull(proxy, f"{REGISTRY_NAME}/test/multi:1", tmp_path / "warm")
    assert pulled_blobs(tmp_path / "warm") == blobs_of(multi_image)
    assert any(e["outcome"] == "stale" for e in proxy.journal())

    # Misses: a blob hubcache never fetched, and a repository it never saw (pushed or not, it
    # cannot be reached). Bounded by the request timeout: a hang fails the test.
    blob = proxied.request(
        proxy.port, REGISTRY_NAME, f"/v2/test/multi/blobs/{arm64.layers[0].digest}", ca=proxy.ca_cert, timeout=30
    )
    assert blob.status == 502, blob.body[:300]
    assert blob.json()["errors"][0]["code"] == "UNAVAILABLE"

    # mitmproxy itself answers a client request it cannot connect upstream for (see below).
    manifest = proxied.request(proxy.port, REGISTRY_NAME, "/v2/test/other/manifests/1", ca=proxy.ca_cert, timeout=30)
    assert manifest.status == 502, manifest.body[:300]
    assert any(e["repository"] == "test/other" and e["outcome"] == "failed" for e in proxy.journal())
    registry.settle()
    assert registry.requests() == [], "nothing reached upstream around the corporate proxy"


def test_corporate_proxy_gone_a_manifest_miss_gets_registry_error_json(hubcache, corporate):
    proxy = behind(hubcache, corporate)
    corporate.stop()
    manifest = proxied.request(proxy.port, REGISTRY_NAME, "/v2/test/other/manifests/1", ca=proxy.ca_cert, timeout=30)
    assert manifest.status == 502
    assert manifest.json()["errors"][0]["code"] == "UNAVAILABLE"
