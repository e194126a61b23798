"""Offline mode: what was pulled online is pulled again with upstream gone, and nothing else is tried."""

from __future__ import annotations

import os

import pytest

from support.clients import Dockerd, pulled_blobs, skopeo_copy
from support.registry import REGISTRY_NAME


def skopeo(proxy, ref, dest):
    return skopeo_copy(f"docker://{ref}", dest, proxy=proxy.url, ca_bundle=proxy.client_bundle)


def test_skopeo_pulls_offline_with_upstream_stopped(hubcache, registry, multi_image, tmp_path):
    ref = f"{REGISTRY_NAME}/test/multi:1"
    proxy = hubcache()
    assert skopeo(proxy, ref, tmp_path / "online").returncode == 0
    proxy.stop()
    registry.stop()  # no upstream at all: any attempt to reach it would fail the pull

    proxy = hubcache(offline=True)
    offline = skopeo(proxy, ref, tmp_path / "offline")
    assert offline.returncode == 0, offline.stderr
    assert pulled_blobs(tmp_path / "offline") == pulled_blobs(tmp_path / "online")
    assert not any(e["outcome"] in ("failed", "stale") for e in proxy.journal())


def test_a_missing_image_fails_fast_with_a_clear_message(hubcache, registry, tmp_path):
    proxy = hubcache(offline=True)
    result = skopeo(proxy, f"{REGISTRY_NAME}/test/never-pulled:1", tmp_path / "out")
    assert result.returncode != 0
    assert "not in the offline cache" in result.stderr, "the client's first answer says why"
    missing = [e for e in proxy.journal() if (e["outcome"], e["reason"]) == ("missing", "offline")]
    assert missing and missing[0]["repository"] == "test/never-pulled"
    registry.settle()
    assert registry.requests() == []


@pytest.mark.dockerd
@pytest.mark.skipif(os.geteuid() != 0, reason="dockerd needs root")
def test_dockerd_pulls_docker_hub_images_offline(hubcache, dockerhub, multi_image, tmp_path):
    amd64 = multi_image.platform("linux/amd64")
    daemon = Dockerd(tmp_path / "dockerd")
    try:
        proxy = hubcache()
        daemon.start(proxy.url, proxy.client_bundle)
        assert daemon.pull("multi:1").returncode == 0
        daemon.wipe()
        proxy.stop()
        dockerhub.reset()

        proxy = hubcache(offline=True)
        daemon.start(proxy.url, proxy.client_bundle)
        result = daemon.pull("multi:1")
        assert result.returncode == 0, result.stdout + result.stderr
        assert daemon.image_diff_ids("multi:1") == amd64.diff_ids

        # A logged-in client sends credentials to the token endpoint; offline, that works too.
        login = daemon.docker("login", "--username", "someone", "--password", "secret")
        assert login.returncode == 0, login.stdout + login.stderr
        assert daemon.docker("rmi", "multi:1").returncode == 0
        again = daemon.pull("multi:1")
        assert again.returncode == 0, again.stdout + again.stderr
        missing = daemon.pull("never-pulled:1")
        assert missing.returncode != 0 and "not in the offline cache" in missing.stdout + missing.stderr
        assert dockerhub.requests() == [], "offline, Docker Hub saw no request at all (not even a token)"
    finally:
        daemon.close()
