"""End to end with a real dockerd (Debian's docker.io) pulling "Docker Hub" images through hubcache."""

from __future__ import annotations

import os
import time

import pytest

from support.clients import Dockerd

BLOB_SERVER_MB = 100

pytestmark = [
    pytest.mark.dockerd,
    pytest.mark.skipif(os.geteuid() != 0, reason="dockerd needs root"),
]


@pytest.fixture
def dockerd(tmp_path):
    daemon = Dockerd(tmp_path / "dockerd")
    yield daemon
    daemon.close()


def timed_pull(daemon: Dockerd, ref: str) -> float:
    start = time.monotonic()
    result = daemon.pull(ref, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return time.monotonic() - start


@pytest.mark.parametrize(
    "image_fixture, blob_urls", [("multi_image", "loopback"), ("multi_image", "https"), ("big_image", "loopback")]
)
def test_repeat_pull_downloads_nothing_from_docker_hub(
    request, hubcache, dockerhub, dockerd, image_fixture, blob_urls, record_property
):
    image = request.getfixturevalue(image_fixture)
    name = "multi" if image_fixture == "multi_image" else "big"
    amd64 = image.platform("linux/amd64")

    proxy = hubcache(blob_urls=blob_urls)
    dockerd.start(proxy.url, proxy.client_bundle)
    cold = timed_pull(dockerd, f"{name}:1")
    assert dockerd.image_diff_ids(f"{name}:1") == amd64.diff_ids
    assert dockerhub.counts()["cdn"] == 1 + len(amd64.layers)
    cold_rss = proxy.memory_mb()  # peak resident set of mitmdump and of the blob server

    # A wiped daemon holds nothing; a restarted proxy holds only its store.
    dockerd.wipe()
    proxy.stop()
    dockerhub.reset()
    proxy = hubcache(blob_urls=blob_urls)
    dockerd.start(proxy.url, proxy.client_bundle)
    warm = timed_pull(dockerd, f"{name}:1")
    assert dockerd.image_diff_ids(f"{name}:1") == amd64.diff_ids
    assert dockerhub.requests(kind="cdn") == []
    assert dockerhub.requests(kind="blob") == []
    assert dockerhub.requests(kind="manifest", method="GET") == []
    assert [r.method for r in dockerhub.requests(kind="manifest")] == ["HEAD"]
    warm_rss = proxy.memory_mb()

    record_property("cold_seconds", round(cold, 2))
    record_property("warm_seconds", round(warm, 2))
    print(f"\n{name}: cold {cold:.2f}s (peak RSS {megabytes(cold_rss)}), warm {warm:.2f}s (peak RSS {megabytes(warm_rss)})")
    # Memory stays flat: no blob is ever held whole, neither by mitmdump nor by the blob server
    # that streams every one of them (the big image's layer is 300 MB).
    for peaks in (cold_rss, warm_rss):
        assert peaks["mitmdump"] < 150 and peaks["blob server"] < BLOB_SERVER_MB, peaks


def megabytes(figures: dict[str, float]) -> str:
    return ", ".join(f"{name} {mb:.0f} MB" for name, mb in figures.items())
