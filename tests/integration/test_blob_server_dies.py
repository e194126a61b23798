"""The blob server process dies under a running proxy (killed, out of memory): what the cache holds
stays pullable. blobserver/host.py runs it as a child of mitmdump and sends every blob GET to it."""

from __future__ import annotations

import os
import signal
import time

from support.clients import pull, pulled_blobs, skopeo_copy
from support.registry import REGISTRY_NAME


def wait_until_exited(pid: int, timeout: float = 30) -> None:
    """Until `pid` has exited: gone, or a zombie its parent has not reaped."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        assert time.monotonic() < deadline, f"process {pid} still running after {timeout}s"
        time.sleep(0.05)


def test_a_pull_after_the_blob_server_died_succeeds(hubcache, registry, multi_image, tmp_path):
    ref = f"{REGISTRY_NAME}/test/multi:1"
    amd64 = multi_image.platform("linux/amd64")
    proxy = hubcache()
    pull(proxy, ref, tmp_path / "before")
    server = proxy.blob_server_pid()
    os.kill(server, signal.SIGKILL)
    wait_until_exited(server)

    # The first pull after it died may fail, but with a registry's error, not at a dead port.
    first = skopeo_copy(f"docker://{ref}", tmp_path / "first", proxy=proxy.url, ca_bundle=proxy.client_bundle, timeout=120)
    assert first.returncode == 0 or "connection refused" not in first.stderr, first.stderr
    # The next one succeeds, from the cache.
    registry.reset_requests()
    pull(proxy, ref, tmp_path / "next", timeout=120)
    assert pulled_blobs(tmp_path / "next") == {amd64.config.digest, *(layer.digest for layer in amd64.layers)}
    registry.settle()
    assert registry.blob_gets() == []
