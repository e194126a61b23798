"""Docker Hub's own behaviour (token realm, 307 to an expiring CDN URL, rate limit, faults), from a
small HTTPS double in front of the real registry, pulled through a real hubcache by skopeo."""

from __future__ import annotations

import time

import pytest

from support.clients import pulled_blobs, skopeo_copy

REF = "docker://registry-1.docker.io/library/multi:1"


def pull(proxy, dest):
    return skopeo_copy(REF, dest, proxy=proxy.url, ca_bundle=proxy.client_bundle)


def test_cold_fill_through_the_cdn_then_warm_pull_never_reaches_docker_hub(hubcache, dockerhub, multi_image, tmp_path):
    amd64 = multi_image.platform("linux/amd64")
    proxy = hubcache()
    cold = pull(proxy, tmp_path / "cold")
    assert cold.returncode == 0, cold.stderr
    counts = dockerhub.counts()
    assert counts["cdn"] == 1 + len(amd64.layers), "each blob crossed the CDN once"
    filled = {e["digest"] for e in proxy.journal() if e["kind"] == "blob" and e["outcome"] == "filled"}
    assert filled == {amd64.config.digest, *(layer.digest for layer in amd64.layers)}

    proxy.stop()
    dockerhub.reset()
    warm = pull(hubcache(), tmp_path / "warm")
    assert warm.returncode == 0, warm.stderr
    assert pulled_blobs(tmp_path / "warm") == pulled_blobs(tmp_path / "cold")
    assert dockerhub.requests(kind="cdn") == []
    assert dockerhub.requests(kind="blob") == []
    assert dockerhub.requests(kind="manifest", method="GET") == []
    assert dockerhub.manifest_gets == 0  # nothing counted against the rate limit


def test_corrupt_cdn_bytes_are_never_stored_or_completed(hubcache, dockerhub, multi_image, tmp_path):
    proxy = hubcache()
    dockerhub.corrupt_cdn(count=100)  # every CDN answer of this pull is corrupt
    broken = pull(proxy, tmp_path / "broken")
    assert broken.returncode != 0
    rejected = [e for e in proxy.journal() if e["outcome"] == "rejected"]
    assert rejected, proxy.journal()
    assert not any(e["outcome"] == "filled" and e["kind"] == "blob" for e in proxy.journal())

    dockerhub.reset()
    healed = pull(proxy, tmp_path / "healed")
    assert healed.returncode == 0, healed.stderr
    amd64 = multi_image.platform("linux/amd64")
    assert amd64.layers[0].digest in pulled_blobs(tmp_path / "healed")


def test_a_truncated_cdn_transfer_is_not_stored(hubcache, dockerhub, multi_image, tmp_path):
    proxy = hubcache()
    dockerhub.truncate_cdn_after(100_000, count=100)
    assert pull(proxy, tmp_path / "broken").returncode != 0
    # The client gave up at the first cut; the fills it started end as upstream's connections do.
    deadline = time.monotonic() + 60
    while list((proxy.cache_dir / "tmp").rglob("fill-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(e["outcome"] == "filled" and e["kind"] == "blob" for e in proxy.journal())
    assert any(e["outcome"] == "failed" and e["reason"].startswith("upstream's answer broke off") for e in proxy.journal())
    dockerhub.reset()
    assert pull(proxy, tmp_path / "ok").returncode == 0
    assert not list((proxy.cache_dir / "tmp").rglob("fill-*")), "no partial file stays behind"


@pytest.mark.parametrize("status", [503, 429])
def test_upstream_errors_on_revalidation_serve_the_cached_manifest(hubcache, dockerhub, multi_image, tmp_path, status):
    proxy = hubcache()
    assert pull(proxy, tmp_path / "fill").returncode == 0
    dockerhub.reset()
    dockerhub.fail_next("manifest", status, count=100)
    stale = pull(proxy, tmp_path / "stale")
    assert stale.returncode == 0, stale.stderr
    assert any((e["outcome"], e["reason"]) == ("stale", f"upstream answered {status}") for e in proxy.journal())
