"""A bounded soak: 50 skopeo clients pull a mix of images (cold at first, then warm) through one
hubcache for a minute. Zero failed pulls, zero corrupt blobs, each blob fetched upstream once,
and the memory of the proxy's processes (mitmdump, and the blob server that streams every blob)
stays flat."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.clients import pulled_blobs, skopeo_copy
from support.images import build_image
from support.registry import REGISTRY_NAME, push

CLIENTS = 50
SECONDS = 60


@pytest.fixture(scope="module")
def soak_images(registry, layouts):
    images = {}
    for i in range(3):
        image = build_image(layouts / f"soak{i}", "1", [1_500_000, 500_000], seed=f"soak{i}", platforms=[("linux", "amd64"), ("linux", "arm64", "v8")])
        images[f"soak/image{i}:1"] = push(registry, f"soak/image{i}:1", image)
    return images


def test_fifty_clients_for_a_minute(hubcache, registry, soak_images, tmp_path, record_property):
    proxy = hubcache()
    results: list[tuple[str, int, str]] = []
    lock = threading.Lock()
    rss: list[dict[str, float]] = []  # resident set of each process, once a second
    deadline = time.monotonic() + SECONDS

    def client(n: int) -> None:
        rng = random.Random(n)
        pulls = 0
        while time.monotonic() < deadline:
            name = rng.choice(sorted(soak_images))
            arch = rng.choice(["amd64", "arm64"])
            dest = tmp_path / f"c{n}-{pulls}"
            result = skopeo_copy(f"docker://{REGISTRY_NAME}/{name}", dest, proxy=proxy.url, ca_bundle=proxy.client_bundle, arch=arch, timeout=120)
            error = result.stderr[-300:] if result.returncode else ""
            if not error:
                platform = soak_images[name].platform("linux/arm64/v8" if arch == "arm64" else "linux/amd64")
                wanted = {platform.config.digest, *(layer.digest for layer in platform.layers)}
                try:
                    if pulled_blobs(dest) != wanted:
                        error = f"pulled {pulled_blobs(dest)} instead of {wanted}"
                except AssertionError as e:  # a blob whose bytes do not match its name
                    error = str(e)
            with lock:
                results.append((n, result.returncode, error))
            pulls += 1

    def watch() -> None:
        while time.monotonic() < deadline:
            rss.append(proxy.memory_mb("VmRSS"))
            time.sleep(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    watcher.join()

    failures = [r for r in results if r[2]]
    registry.settle()
    blob_gets = [r.path.rsplit("/", 1)[-1] for r in registry.blob_gets()]
    distinct = {b.digest for image in soak_images.values() for p in image.platforms for b in (p.config, *p.layers)}
    growth, memory = {}, []
    for process in rss[0]:
        series = [sample[process] for sample in rss]
        early, late = max(series[5:15] or series), max(series[-10:])
        growth[process] = late - early
        memory.append(
            f"{process} RSS {series[0]:.0f} MB at start, {early:.0f} MB after 15 s, {late:.0f} MB at the end, "
            f"peak {max(series):.0f} MB"
        )
    summary = (
        f"{len(results)} pulls by {CLIENTS} clients in {SECONDS}s, {len(failures)} failed; upstream blob GETs "
        f"{len(blob_gets)} for {len(distinct)} distinct blobs; " + "; ".join(memory)
    )
    print("\n" + summary)
    record_property("soak", summary)
    assert not failures, failures[:3]
    assert {n for n, _, _ in results} == set(range(CLIENTS)), "every client pulled"
    assert sorted(blob_gets) == sorted(distinct), "each blob crossed from upstream exactly once"
    assert set(growth) == {"mitmdump", "blob server"}
    assert max(growth.values()) < 50, f"memory grew: {summary}"
