"""Eviction in a running proxy while its blob server streams the evicted blob: the transfer under
way completes intact, and the next request fetches the blob again."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from support import proxied
from support.images import build_image
from support.registry import REGISTRY_NAME, push

HUBCACHE = Path(sys.executable).with_name("hubcache")
MiB = 1 << 20


def hubcache_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([HUBCACHE, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def deleted_files_open(pid: int) -> list[str]:
    """Files that process `pid` holds open and that were removed from their folder."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.endswith(" (deleted)"):
            found.append(target)
    return found


def test_a_blob_evicted_while_it_streams_arrives_whole(hubcache, registry, layouts):
    # Larger than what the sockets between the blob server and the client can hold.
    image = push(registry, "evict/streamed:1", build_image(layouts / "evict", "1", [64_000_000], seed="evict"))
    layer = image.platforms[0].layers[0]
    path = f"/v2/evict/streamed/blobs/{layer.digest}"
    proxy = hubcache()
    filled = proxied.request(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert)
    assert filled.status == 200 and hashlib.sha256(filled.body).hexdigest() == layer.digest[7:]
    assert [e["outcome"] for e in proxy.journal() if e["digest"] == layer.digest] == ["filled"]
    registry.settle()
    registry.reset_requests()

    with proxied.opened(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert) as response:
        assert response.status == 200
        first = response.read(MiB)  # the blob server is sending it from the store now
        assert deleted_files_open(proxy.blob_server_pid()) == []
        pruned = hubcache_cli("prune", "--all", "--cache-dir", proxy.cache_dir)
        assert pruned.stdout.startswith("freed ") and ": 1 blob," in pruned.stdout, pruned.stdout
        assert json.loads(hubcache_cli("stats", "--json", "--cache-dir", proxy.cache_dir).stdout)["blobs"] == 0
        # Mid-stream: the blob server still sends from the file eviction removed.
        assert deleted_files_open(proxy.blob_server_pid()), "the blob server no longer holds the evicted file"
        rest = response.read()
    assert len(first) + len(rest) == layer.size
    assert hashlib.sha256(first + rest).hexdigest() == layer.digest[7:]
    registry.settle()
    assert registry.blob_gets() == [], "the transfer under way came from the evicted file"

    # The next client's request fetches it again, whole.
    again = proxied.request(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert)
    assert again.status == 200 and hashlib.sha256(again.body).hexdigest() == layer.digest[7:]
    registry.settle()
    assert [r.reference for r in registry.blob_gets()] == [layer.digest]
