"""Upstream serves a manifest whose bytes do not match its digest (the one asked for, or the one
its Docker-Content-Digest claims for a tag): the client gets a registry error, nothing is stored,
and once upstream serves the right bytes the same pull works and is cached."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from support import proxied
from support.clients import pull, pulled_blobs, skopeo_copy

HUBCACHE = Path(sys.executable).with_name("hubcache")
HUB = "registry-1.docker.io"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def stored(proxy) -> dict:
    """What the proxy's store holds: counts of blobs, manifests, tags (hubcache stats)."""
    done = subprocess.run([HUBCACHE, "stats", "--json", "--cache-dir", proxy.cache_dir], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    return {kind: counts[kind] for kind in ("blobs", "manifests", "tags")}


def test_a_tag_whose_manifest_does_not_match_fails_the_pull_and_stores_nothing(hubcache, dockerhub, multi_image, tmp_path):
    proxy = hubcache()
    ref = f"{HUB}/library/multi:1"
    dockerhub.corrupt_manifests(10)  # whatever skopeo retries
    refused = skopeo_copy(f"docker://{ref}", tmp_path / "refused", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert refused.returncode != 0
    assert "reading manifest 1" in refused.stderr and "502 Bad Gateway" in refused.stderr, refused.stderr
    journal = [(e["reference"], e["outcome"], e["reason"]) for e in proxy.journal()]
    assert journal and set(journal) == {("1", "rejected", "digest mismatch")}, journal
    assert stored(proxy) == {"blobs": 0, "manifests": 0, "tags": 0}

    dockerhub.reset()  # upstream serves the right bytes again
    pull(proxy, ref, tmp_path / "pulled")
    amd64 = multi_image.platform("linux/amd64")
    assert pulled_blobs(tmp_path / "pulled") == {amd64.config.digest, *(layer.digest for layer in amd64.layers)}
    filled = {e["digest"] for e in proxy.journal() if e["kind"] == "manifest" and e["outcome"] == "filled"}
    assert filled == {multi_image.index_digest, amd64.manifest.digest}
    assert stored(proxy)["tags"] == 1


def test_a_manifest_by_digest_that_does_not_match_is_refused_then_fetched_whole(hubcache, dockerhub, multi_image):
    proxy = hubcache()
    digest = multi_image.platform("linux/amd64").manifest.digest
    path = f"/v2/library/multi/manifests/{digest}"
    token = proxied.docker_hub_token(proxy.port, "library/multi", ca=proxy.ca_cert)
    headers = {"Authorization": f"Bearer {token}", "Accept": OCI_MANIFEST}

    dockerhub.corrupt_manifests(1)
    refused = proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=headers)
    assert refused.status == 502
    assert refused.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    assert digest in refused.json()["errors"][0]["message"]
    assert [(e["outcome"], e["reason"]) for e in proxy.journal() if e["reference"] == digest] == [("rejected", "digest mismatch")]
    assert stored(proxy)["manifests"] == 0

    # Upstream's next answer is right: served, stored, then served from the cache.
    answer = proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=headers)
    assert answer.status == 200 and hashlib.sha256(answer.body).hexdigest() == digest[7:]
    dockerhub.reset()
    again = proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=headers)
    assert again.status == 200 and again.body == answer.body
    assert dockerhub.requests(kind="manifest", method="GET") == []
