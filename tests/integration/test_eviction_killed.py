"""A proxy killed in the middle of an eviction pass: every tag it leaves is whole (it pulls
offline, with upstream gone) or gone; none names an evicted blob."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time

from hubcache.storage.store import Store
from support.clients import pull, skopeo_copy
from support.images import build_image
from support.registry import REGISTRY_NAME, push

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EXTRA = 600  # manifests (of ten blobs each) beside the pulled images: a pass of many slices


def add_content(store: Store, start: int, count: int) -> None:
    """`count` images of ten tiny blobs each, tagged, through the store's own API."""
    for m in range(start, start + count):
        blobs = [f"extra {m} {n}".encode() for n in range(10)]
        for data in blobs:
            writer = store.blob_writer("sha256:" + hashlib.sha256(data).hexdigest())
            writer.write(data)
            writer.close()
            writer.commit()
        descriptors = [{"mediaType": "application/octet-stream", "digest": "sha256:" + hashlib.sha256(d).hexdigest(), "size": len(d)} for d in blobs]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptors[0], "layers": descriptors[1:]}).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        store.put_manifest(digest, OCI_MANIFEST, body)
        store.set_tag("extra.hubcache.test", "extra/app", str(m), digest)


def whole(store: Store, digest: str) -> bool:
    return store.has_manifest(digest) and all(store.has_blob(b) for b in store.named(digest, blob=True))


def test_a_proxy_killed_mid_pass_leaves_every_tag_whole_or_gone(hubcache, registry, layouts, tmp_path):
    names = [f"killed/app{n}:1" for n in range(3)]
    for n, name in enumerate(names):
        push(registry, name, build_image(layouts / f"killed{n}", "1", [40_000, 30_000], seed=f"killed{n}"))
    proxy = hubcache()
    store = Store(proxy.cache_dir)
    try:
        for n, name in enumerate(names):  # the pulled images between the other content, in LRU order
            pull(proxy, f"{REGISTRY_NAME}/{name}", tmp_path / f"online{n}")
            add_content(store, n * EXTRA // 3, EXTRA // 3)
    finally:
        store.close()
    proxy.stop()
    # All of it last used two hours ago, so that none of it counts as in use.
    with sqlite3.connect(proxy.cache_dir / "content" / "cache.db") as db:
        db.execute("UPDATE Cache SET access_time = access_time - 7200")

    proxy.start(cache_size_limit="1", termlog_verbosity="debug")
    deadline = time.monotonic() + 120  # the first pass starts 30 s after the start
    while "hubcache: evicting: " not in proxy.log_text():
        assert time.monotonic() < deadline and proxy.proc.alive(), proxy.log_text()[-3000:]
        time.sleep(0.01)
    proxy.proc.kill()  # SIGKILL, in the middle of the pass

    store = Store(proxy.cache_dir)
    try:
        tags = store.tags()
        left = {key[2] for key, _ in tags if key[0] == "extra.hubcache.test"}
        assert 0 < len(left) < EXTRA, f"the kill landed in the middle of the pass ({len(left)} of {EXTRA} extra tags left)"
        assert all(whole(store, entry.digest) for _, entry in tags), "a tag names an evicted blob"
        held = {f"{name}:{tag}" for (registry_, name, tag), _ in tags if registry_ == REGISTRY_NAME}
        assert names[0] not in held and names[-1] in held, f"the first image went in the first slice, the last is to come: {held}"
    finally:
        store.close()
    registry.stop()
    offline = hubcache(tmp_path / "offline", cache_dir=proxy.cache_dir, offline=True)
    for n, name in enumerate(names):
        copied = skopeo_copy(f"docker://{REGISTRY_NAME}/{name}", tmp_path / f"offline{n}", proxy=offline.url, ca_bundle=offline.client_bundle)
        assert (copied.returncode == 0) == (name in held), f"{name}: {copied.stderr}"
