"""Fills under load and faults, with real processes: one upstream fetch per blob for any number of
clients, streamed to them as it grows, unaffected by clients that leave, bounded when upstream hangs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hubcache.cache import fills
from support import proxied
from support.clients import pulled_blobs, skopeo_copy
from support.hostile import Hostile
from support.hubcache import upstream_options
from support.registry import REGISTRY_NAME


def wait_for_outcome(proxy, digest: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in proxy.journal(settle=False):
            if entry["digest"] == digest and entry["kind"] == "blob":
                return entry
        time.sleep(0.2)
    raise AssertionError(f"no journal line for {digest} within {timeout}s")


def test_sixteen_clients_at_once_make_one_upstream_fetch_per_blob(hubcache, registry, multi_image, tmp_path):
    proxy = hubcache()
    ref = f"docker://{REGISTRY_NAME}/test/multi:1"

    def pull(i: int):
        return skopeo_copy(ref, tmp_path / f"client-{i}", proxy=proxy.url, ca_bundle=proxy.client_bundle, timeout=240)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(pull, range(16)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    amd64 = multi_image.platform("linux/amd64")
    wanted = {amd64.config.digest, *(layer.digest for layer in amd64.layers)}
    for i in range(16):
        assert pulled_blobs(tmp_path / f"client-{i}") == wanted
    registry.settle()
    fetched = [r.path.rsplit("/", 1)[-1] for r in registry.blob_gets()]
    assert sorted(fetched) == sorted(wanted), "upstream served each blob exactly once"


def blob_path(image) -> tuple[str, str]:
    layer = image.platforms[0].layers[0]
    return layer.digest, f"/v2/library/big/blobs/{layer.digest}"


def test_a_client_that_leaves_does_not_abort_the_fill(hubcache, registry, big_image):
    proxy = hubcache()
    digest, path = blob_path(big_image)
    with proxied.opened(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert) as response:
        assert response.status == 200
        assert len(response.read(1 << 20)) == 1 << 20
    # The client is gone; the fill it started goes on for whoever asks next.
    assert wait_for_outcome(proxy, digest)["outcome"] == "filled"
    again = proxied.request(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert)
    assert hashlib.sha256(again.body).hexdigest() == digest[7:]
    registry.settle()
    assert len(registry.blob_gets()) == 1


def test_a_second_client_streams_the_fill_as_it_grows(hubcache, registry, big_image):
    proxy = hubcache()
    digest, path = blob_path(big_image)
    with proxied.opened(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert) as first:
        with proxied.opened(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert) as second:
            start = second.read(1 << 20)
            assert not any(e["digest"] == digest for e in proxy.journal(settle=False)), (
                "the second client had its first bytes before the fill completed"
            )
            rest = second.read()
        whole = first.read()
    assert hashlib.sha256(start + rest).hexdigest() == digest[7:]
    assert hashlib.sha256(whole).hexdigest() == digest[7:]
    registry.settle()
    assert len(registry.blob_gets()) == 1


def test_a_silent_upstream_is_given_up_after_fill_timeout(hubcache, dockerhub, multi_image):
    proxy = hubcache(fill_timeout=2)
    token = proxied.request(
        proxy.port, "auth.docker.io", "/token?service=registry.docker.io&scope=repository:library/multi:pull", ca=proxy.ca_cert
    )
    auth = {"Authorization": f"Bearer {json.loads(token.body)['token']}"}
    digest = multi_image.platform("linux/amd64").layers[0].digest
    dockerhub.hang_next("cdn", 600)  # released at the test's end
    try:
        answer = proxied.request(
            proxy.port, "registry-1.docker.io", f"/v2/library/multi/blobs/{digest}", ca=proxy.ca_cert, headers=auth, timeout=60
        )
    except TimeoutError:
        pytest.fail("hubcache never gave up on the silent upstream")
    assert "cdn" in [begun[2] for begun in dockerhub.begun()] and dockerhub.requests(kind="cdn") == [], (
        "the answer came while upstream still held the request: hubcache gave up on its own"
    )
    assert answer.status == 502
    assert "upstream sent nothing for 2s" in answer.json()["errors"][0]["message"]
    entry = wait_for_outcome(proxy, digest)
    assert (entry["outcome"], entry["reason"]) == ("failed", "upstream sent nothing for 2s")
    proxy.journal()  # once the fill is over, its temporary file is gone too
    assert not list((proxy.cache_dir / "tmp").rglob("fill-*"))


def blob_server_pids(cache_dir) -> list[int]:
    wanted = str(cache_dir.resolve())
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"hubcache.blobserver.server" in argv and wanted.encode() in argv:
                pids.append(int(entry))
    return pids


def test_a_proxy_killed_mid_fill_leaves_nothing_partial(hubcache, registry, big_image):
    proxy = hubcache()
    digest, path = blob_path(big_image)
    with proxied.opened(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert) as response:
        response.read(1 << 20)
        assert list((proxy.cache_dir / "tmp").rglob("fill-*")), "a fill is under way"
        assert blob_server_pids(proxy.cache_dir)
        os.kill(proxy.proc.pid, signal.SIGKILL)  # the proxy alone, not its blob server
    proxy.proc.wait(10)
    deadline = time.monotonic() + 10
    while blob_server_pids(proxy.cache_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert blob_server_pids(proxy.cache_dir) == [], "the blob server exits with the proxy"

    proxy.start()
    assert not list((proxy.cache_dir / "tmp").rglob("fill-*")), "a restart cleans what the dead process left"
    answer = proxied.request(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert)
    assert hashlib.sha256(answer.body).hexdigest() == digest[7:]
    assert wait_for_outcome(proxy, digest)["outcome"] == "filled"


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a tmpfs of a given size as a hubcache workdir's cache folder; returns the workdir."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs-{len(mounted)}" / "cache"
        folder.mkdir(parents=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder.parent

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_still_serves_pulls(hubcache, registry, multi_image, tmpfs, tmp_path):
    proxy = hubcache(tmpfs("8m"))  # too small for any blob with the room hubcache keeps free
    result = skopeo_copy(f"docker://{REGISTRY_NAME}/test/multi:1", tmp_path / "out", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert result.returncode == 0, result.stderr + proxy.log_text()[-2000:]
    amd64 = multi_image.platform("linux/amd64")
    assert {layer.digest for layer in amd64.layers} <= pulled_blobs(tmp_path / "out")
    assert "too few for" in proxy.log_text(), "the operator is told why"
    passed = [e for e in proxy.journal() if e["kind"] == "blob" and e["outcome"] == "passed"]
    assert len(passed) == 1 + len(amd64.layers)
    assert not list((proxy.cache_dir / "tmp").rglob("fill-*"))
    proxy.stop()



ENDLESS_NAME = "endless.hubcache.test"


def test_an_endless_blob_from_upstream_is_kept_only_down_to_the_reserve(hubcache, registry, dockerhub, ca, multi_image, tmpfs, tmp_path):
    """A hostile upstream answers a blob with a chunked body of no announced size, far larger
    than the cache folder: the fill stops keeping it once the folder is down to its reserve (the
    disk never fills), the blob is not stored, and the next pull is cached as usual."""
    cert, key = ca.issue("endless", [ENDLESS_NAME])
    attacker = Hostile("endless", cert, key)
    try:
        usual = upstream_options(registry, dockerhub)
        proxy = hubcache(
            tmpfs("160m"),
            registries=[*usual["registries"], ENDLESS_NAME],
            upstream_map=[*usual["upstream_map"], f"{ENDLESS_NAME}=127.0.0.1:{attacker.port}"],
        )
        digest = "sha256:" + "d" * 64
        with proxied.opened(proxy.port, ENDLESS_NAME, f"/v2/evil/endless/blobs/{digest}", ca=proxy.ca_cert, follow=False) as answer:
            assert answer.status in (200, 307, 502), answer.status
        entry = wait_for_outcome(proxy, digest, timeout=120)
    finally:
        attacker.stop()
    assert attacker.sent > 160 * 1024 * 1024, "upstream sent more than the folder holds"
    assert entry["outcome"] == "failed", entry
    free = int(re.search(r"down to (\d+) bytes free", entry["reason"] or "")[1])  # type: ignore[index]
    assert fills.FREE_SPACE_RESERVE - 2 * fills.ROOM_CHECK < free < fills.FREE_SPACE_RESERVE, entry
    assert not list((proxy.cache_dir / "tmp").rglob("fill-*")), "what it kept is gone"
    result = skopeo_copy(f"docker://{REGISTRY_NAME}/test/multi:1", tmp_path / "out", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert result.returncode == 0, result.stderr + proxy.log_text()[-2000:]
    assert {layer.digest for layer in multi_image.platform("linux/amd64").layers} <= pulled_blobs(tmp_path / "out")
    assert wait_for_outcome(proxy, multi_image.platform("linux/amd64").layers[0].digest)["outcome"] == "filled"
