"""Two proxies on one cache folder (two instances behind one port, or a restart that overlaps the
old process): hubcache allows it, its store being safe across processes (storage/store.py). A proxy that
starts leaves the other's fills in progress alone, each serves what the other filled, the journal
keeps one line per fill, and one stopping leaves the other serving."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path

from support import proxied
from support.clients import pull, pulled_blobs
from support.images import ImageInfo, build_image
from support.registry import REGISTRY_NAME, push

HUBCACHE = Path(sys.executable).with_name("hubcache")
HUB = "registry-1.docker.io"
MiB = 1 << 20


def cold_image(registry, layouts: Path, sizes: list[int], prefix: str = "test") -> tuple[str, ImageInfo]:
    """A single-platform image nobody pulled yet, pushed as REPOSITORY:1; the repository."""
    name = f"{prefix}/folder{uuid.uuid4().hex[:10]}"
    return name, push(registry, f"{name}:1", build_image(layouts / name.replace("/", "-"), "1", sizes, seed=name))


def blob_digests(image: ImageInfo) -> set[str]:
    platform = image.platforms[0]
    return {platform.config.digest, *(layer.digest for layer in platform.layers)}


def test_two_proxies_share_one_cache_folder(hubcache, registry, dockerhub, layouts, tmp_path):
    a = hubcache(tmp_path / "a")
    # The second starts while the first has a fill in progress in the folder (tmp/<pid>/).
    name, image = cold_image(registry, layouts, [4_000_000], prefix="library")
    layer = image.platforms[0].layers[0]
    path = f"/v2/{name}/blobs/{layer.digest}"
    auth = {"Authorization": "Bearer " + proxied.docker_hub_token(a.port, name, ca=a.ca_cert)}
    dockerhub.stall_cdn_after(MiB)
    with proxied.opened(a.port, HUB, path, ca=a.ca_cert, headers=auth) as streaming:
        first = streaming.read(MiB)
        b = hubcache(tmp_path / "b", cache_dir=a.cache_dir)
        assert f"content store in {a.cache_dir.resolve()}" in b.log_text()
        dockerhub.resume_cdn()
        rest = streaming.read()
    assert hashlib.sha256(first + rest).hexdigest() == layer.digest[7:]
    stalled = [e["outcome"] for e in a.journal() if e["digest"] == layer.digest]
    assert stalled == ["filled"]
    images = [cold_image(registry, layouts, [3_000_000, 1_000_000]) for _ in range(2)]

    # What one fills, the other serves without asking upstream for it; both ways.
    for n, ((name, image), (filler, server)) in enumerate(zip(images, ((a, b), (b, a)), strict=True)):
        ref = f"{REGISTRY_NAME}/{name}:1"
        pull(filler, ref, tmp_path / f"filled-{n}")
        registry.settle()
        registry.reset_requests()
        pull(server, ref, tmp_path / f"served-{n}")
        assert pulled_blobs(tmp_path / f"served-{n}") == blob_digests(image)
        registry.settle()
        assert registry.blob_gets() == [] and registry.manifest_gets() == []

    # One store and one journal: every line whole, each blob journalled once, by its filler.
    a.journal()
    b.journal()  # both done with their fills
    entries = [json.loads(line) for line in (a.cache_dir / "misses.jsonl").read_text().splitlines()]
    every = {digest for _, image in images for digest in blob_digests(image)} | {layer.digest}
    assert Counter(e["digest"] for e in entries if e["kind"] == "blob") == Counter(every)
    stats = subprocess.run([HUBCACHE, "stats", "--json", "--cache-dir", a.cache_dir], capture_output=True, text=True, timeout=60)
    assert json.loads(stats.stdout)["blobs"] == len(every)

    # One stopping leaves the other serving.
    a.stop()
    name, image = images[0]
    pull(b, f"{REGISTRY_NAME}/{name}:1", tmp_path / "after-a")
    assert pulled_blobs(tmp_path / "after-a") == blob_digests(image)


def read_rest(response: http.client.HTTPResponse, into: list[bytes | Exception]) -> None:
    try:
        into.append(response.read())
    except (http.client.IncompleteRead, OSError) as e:
        into.append(e)


def test_a_fill_the_other_proxy_finishes_first_still_reaches_its_client_whole(hubcache, registry, dockerhub, layouts, tmp_path):
    name, image = cold_image(registry, layouts, [8_000_000], prefix="library")
    layer = image.platforms[0].layers[0]
    path = f"/v2/{name}/blobs/{layer.digest}"
    a = hubcache(tmp_path / "a")
    b = hubcache(tmp_path / "b", cache_dir=a.cache_dir)
    auth = {"Authorization": "Bearer " + proxied.docker_hub_token(b.port, name, ca=b.ca_cert)}

    dockerhub.stall_cdn_after(MiB)  # B's fill gets a first MiB, then upstream waits
    with proxied.opened(b.port, HUB, path, ca=b.ca_cert, headers=auth) as streaming:
        assert streaming.status == 200
        first = streaming.read(MiB)
        # Meanwhile A fills the same blob whole and commits it to the folder they share.
        whole = proxied.request(a.port, HUB, path, ca=a.ca_cert, headers=auth)
        assert whole.status == 200 and hashlib.sha256(whole.body).hexdigest() == layer.digest[7:]
        rest: list[bytes | Exception] = []
        reader = threading.Thread(target=read_rest, args=(streaming, rest))
        reader.start()
        # B may finish from the blob A committed; if it waits for its own fill, upstream resumes.
        reader.join(5)
        dockerhub.resume_cdn()
        reader.join(120)
    assert rest and isinstance(rest[0], bytes), rest
    assert len(first) + len(rest[0]) == layer.size
    assert hashlib.sha256(first + rest[0]).hexdigest() == layer.digest[7:]
