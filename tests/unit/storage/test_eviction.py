"""Eviction by size and age (recordings pinned, tags kept consistent) and re-verification."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from hubcache.registry.protocol import ImageReference, digest_of
from hubcache.storage.eviction import LOOKAHEAD, EvictionPass, Upkeep, choose, least_recently_used, parse_size, prune, remove, verify
from hubcache.storage.recordings import Recording, image_from_store
from hubcache.storage.store import STRAY_AGE, BlobEntry, Store
from support.addons import CacheAddons
from support.fill import store_image
from support.images import build_image

REGISTRY = "registry.example.test"
MB = 1_000_000


@pytest.mark.parametrize(
    "text, size",
    [("1000", 1000), ("20GB", 20 * 10**9), ("500MiB", 500 * 2**20), ("1.5T", int(1.5 * 10**12)), ("64kB", 64_000), ("2KiB", 2048)],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "12 parsecs", "-5GB"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def entries(*specs) -> list[BlobEntry]:
    return [BlobEntry(f"sha256:{name * 64}", size, used) for name, size, used in specs]


def test_least_recently_used_go_first_until_under_the_limit():
    blobs = entries(("a", 40, 100), ("b", 40, 200), ("c", 40, 300))
    chosen = list(choose(blobs, total=sum(b.size for b in blobs), limit=50, max_unused=None, keep=set(), now=10_000, in_use=600))
    assert [b.digest[7] for b in chosen] == ["a", "b"]


def test_pinned_and_recently_used_blobs_are_spared():
    blobs = entries(("a", 40, 100), ("c", 40, 300), ("b", 40, 9_900))
    chosen = list(choose(blobs, total=sum(b.size for b in blobs), limit=0, max_unused=None, keep={f"sha256:{'c' * 64}"}, now=10_000, in_use=600))
    assert [b.digest[7] for b in chosen] == ["a"]


def test_expiry_drops_only_what_went_unused():
    blobs = entries(("a", 1, 100), ("b", 1, 9_000))
    chosen = list(choose(blobs, total=sum(b.size for b in blobs), limit=None, max_unused=5_000, keep=set(), now=10_000, in_use=0))
    assert [b.digest[7] for b in chosen] == ["a"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    layout = tmp_path_factory.mktemp("layouts")
    one = build_image(layout / "one", "1", [1 * MB, 2 * MB], seed="one", platforms=[("linux", "amd64"), ("linux", "arm64")])
    two = build_image(layout / "two", "1", [3 * MB], seed="two")
    return one, two


class Clock:
    """time.time(), moved on by whole seconds when told: which of two uses came first never rests
    on the clock's resolution."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ahead = 0.0
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + self.ahead)

    def advance(self) -> None:
        self.ahead += 1.0


@pytest.fixture
def clock(monkeypatch) -> Clock:
    return Clock(monkeypatch)


@pytest.fixture
def store(tmp_path, images, clock):
    s = Store(tmp_path / "cache")
    one, two = images
    store_image(s, one, REGISTRY, "one", "1")
    clock.advance()
    store_image(s, two, REGISTRY, "two", "1")
    yield s
    s.close()


def blob_digests(image) -> set[str]:
    return {b.digest for p in image.platforms for b in (p.config, *p.layers)}


def test_prune_keeps_the_tag_index_consistent(store, images):
    one, two = images
    result = prune(store, store.directory, limit=3_200_000, in_use=0)
    assert result.remaining <= 3_200_000
    assert not any(store.has_blob(d) for d in blob_digests(one)), "the older image went first"
    assert all(store.has_blob(d) for d in blob_digests(two))
    # Every manifest of `one` lost blobs: they and the tag that led to them are gone, the index stays.
    assert store.get_tag(REGISTRY, "one", "1") is None
    assert all(store.get_manifest(p.manifest.digest) is None for p in one.platforms)
    assert store.get_tag(REGISTRY, "two", "1") is not None
    assert (result.blobs, result.manifests, result.tags) == (6, 2, 1)


def test_a_recording_pins_its_content(store, images):
    one, two = images
    recording = Recording.open(store.directory, "lab")
    recording.images["x"] = image_from_store(store, REGISTRY, "one", "1")
    recording.save()
    prune(store, store.directory, limit=0, in_use=0)
    assert all(store.has_blob(d) for d in blob_digests(one))
    assert store.get_tag(REGISTRY, "one", "1") is not None
    assert not any(store.has_blob(d) for d in blob_digests(two))


def test_recently_used_blobs_are_in_use(store):
    result = prune(store, store.directory, limit=0, in_use=600)  # everything was used just now
    assert result.blobs == 0


def test_an_unreadable_recording_stops_eviction(store, images):
    (store.directory / "recordings").mkdir()
    (store.directory / "recordings" / "bad.yaml").write_text("{")
    with pytest.raises(Exception, match="not a readable recording"):
        prune(store, store.directory, limit=0, in_use=0)
    assert len(store.blob_entries()) == len(blob_digests(images[0]) | blob_digests(images[1]))


def test_a_read_makes_a_blob_recently_used(store, images, clock):
    one, _ = images
    first = one.platforms[0].layers[0].digest
    clock.advance()
    with store.open_blob(first):
        pass
    assert [b.digest for b in least_recently_used(store)][-1] == first, "eviction comes to it last"


def test_verify_drops_what_rotted(store, images):
    one, two = images
    layer = one.platforms[0].layers[1].digest
    with store.open_blob(layer) as f:
        path = f.name
    with open(path, "r+b") as f:
        f.write(b"rot")
    result = verify(store)
    assert result.dropped == [layer]
    assert result.checked == len(blob_digests(one) | blob_digests(two)) + 3  # and the index and two manifests
    assert not store.has_blob(layer)
    # The platform manifest naming the layer went with it, and the tag leading to it: no tag is
    # left that cannot pull. The other image is untouched.
    assert store.get_manifest(one.platforms[0].manifest.digest) is None
    assert store.get_tag(REGISTRY, "one", "1") is None
    assert (result.manifests, result.tags) == (1, 1)
    assert store.get_tag(REGISTRY, "two", "1") is not None and store.get_manifest(two.top.digest) is not None
    assert verify(store).dropped == []


def test_verify_removes_the_files_a_crash_left_and_nothing_else(store, images):
    one, _ = images
    with store.open_blob(one.platforms[0].layers[0].digest) as f:
        held = Path(f.name)
    long_ago = time.time() - 2 * STRAY_AGE
    os.utime(held, (long_ago, long_ago))  # named by an entry: kept, however old
    folder = store.directory / "content" / "ab" / "cd"
    folder.mkdir(parents=True, exist_ok=True)
    left = folder / "0123456789abcdef0123456789ab.val"
    left.write_bytes(b"dropped, but the crash came before its removal")
    os.utime(left, (long_ago, long_ago))
    moving_in = folder / "fedcba9876543210fedcba987654.val"
    moving_in.write_bytes(b"another process's fill, its commit under way")
    result = verify(store)
    assert result.strays == 1 and not left.exists()
    assert moving_in.exists() and held.exists() and result.dropped == []
    assert store.open_blob(one.platforms[0].layers[0].digest) is not None


def test_verify_drops_a_rotten_manifest_with_its_tag(store, images):
    _, two = images
    digest = two.top.digest
    manifest = store.get_manifest(digest)
    store._cache.set(("manifest", digest), (manifest.media_type, manifest.body + b" "))
    result = verify(store)
    assert result.dropped == [digest]
    assert store.get_manifest(digest) is None and store.get_tag(REGISTRY, "two", "1") is None
    assert (result.manifests, result.tags) == (0, 1)
    assert store.get_tag(REGISTRY, "one", "1") is not None


def test_verify_drops_a_blob_cut_short(store, images):
    one, _ = images
    layer = one.platforms[0].layers[1].digest
    with store.open_blob(layer) as f:
        os.truncate(f.name, 1000)
    result = verify(store)
    assert result.dropped == [layer] and (result.manifests, result.tags) == (1, 1)


@pytest.mark.parametrize("change", ["cut short", "emptied", "grown"])
def test_a_blob_whose_file_changed_size_is_a_miss_dropped_with_what_names_it(store, images, change, caplog):
    """A file whose size is not the one it verified at (a machine that lost power before its disk
    had the data, a copy that stopped, a hand) is never handed out: the next pull fetches it again."""
    one, two = images
    layer = one.platforms[0].layers[1].digest
    with store.open_blob(layer) as f:
        path, size = f.name, os.fstat(f.fileno()).st_size
    if change == "grown":
        with open(path, "ab") as f:
            f.write(b"more")
    else:
        os.truncate(path, {"cut short": size // 2, "emptied": 0}[change])
    assert store.blob_size(layer) is None and store.open_blob(layer) is None
    assert not store.has_blob(layer)
    assert store.get_manifest(one.platforms[0].manifest.digest) is None and store.get_tag(REGISTRY, "one", "1") is None
    assert f"blob {layer} is" in caplog.text and f"not the {size} it verified at" in caplog.text
    # What kept its size is served as before: the image's other layer, the other image.
    other = one.platforms[0].layers[0]
    with store.open_blob(other.digest) as f:
        assert digest_of(f.read()) == other.digest
    assert store.get_tag(REGISTRY, "two", "1") is not None and store.blob_size(two.platforms[0].layers[0].digest) == two.platforms[0].layers[0].size


def test_a_manifest_changed_on_disk_is_a_miss_dropped_with_its_tag(store, images, caplog):
    one, two = images
    digest = two.top.digest
    manifest = store.get_manifest(digest)
    store._cache.set(("manifest", digest), (manifest.media_type, manifest.body + b" "))
    assert store.get_manifest(digest) is None
    assert store.stored_manifest(digest) is None and store.get_tag(REGISTRY, "two", "1") is None
    assert f"manifest {digest} no longer hashes to its digest" in caplog.text
    assert store.get_manifest(one.top.digest).digest == one.top.digest


@pytest.fixture
def upkeep(tmp_path):
    addons = CacheAddons()
    addon = Upkeep(addons.folder)
    with taddons.context(Proxyserver(), *addons.addons(), addon) as tctx:
        tctx.options.update(cache_dir=str(tmp_path / "cache"))
        yield tctx, addon
        addons.folder.done()


def test_options_are_validated(upkeep):
    tctx, addon = upkeep
    tctx.configure(addon, cache_size_limit="2GiB")
    assert addon.limit == 2 * 2**30
    with pytest.raises(exceptions.OptionsError, match="cache_size_limit"):
        tctx.configure(addon, cache_size_limit="lots")
    with pytest.raises(exceptions.OptionsError, match="expire_unused_days"):
        tctx.configure(addon, expire_unused_days=-1)


async def test_the_addon_evicts_with_its_options(upkeep, images, monkeypatch):
    tctx, addon = upkeep
    one, _ = images
    store = addon.folder.store
    store_image(store, one, REGISTRY, "one", "1")
    assert await addon.evict() is None, "no limit set: nothing to do"
    tctx.configure(addon, cache_size_limit="1MB")
    monkeypatch.setattr("hubcache.storage.eviction.IN_USE", 0.0)
    result = await addon.evict()
    assert result.remaining <= 1_000_000 and result.blobs > 0


async def test_the_running_proxy_spares_blobs_used_in_the_last_ten_minutes(upkeep, images):
    # A client may just have been sent to a blob: its signed URL lives that long.
    tctx, addon = upkeep
    one, _ = images
    store = addon.folder.store
    store_image(store, one, REGISTRY, "one", "1")  # every blob used just now
    tctx.configure(addon, cache_size_limit="1MB")
    result = await addon.evict()
    assert result.blobs == 0 and all(store.has_blob(d) for d in blob_digests(one))


def ref(text: str) -> ImageReference:
    return ImageReference.parse(f"{REGISTRY}/{text}")


def manifest_digests(image) -> set[str]:
    return {image.top.digest, *(p.manifest.digest for p in image.platforms)}


def test_rm_removes_the_image_and_nothing_else(store, images):
    one, two = images
    result = remove(store, store.directory, [ref("one:1")])
    assert result.tags == [f"{REGISTRY}/one:1"] and result.missing == [] and result.kept == []
    assert set(result.manifests) == manifest_digests(one) and set(result.blobs) == blob_digests(one)
    assert result.bytes == sum(b.size for p in one.platforms for b in (p.config, *p.layers))
    assert store.get_tag(REGISTRY, "one", "1") is None
    assert not any(store.get_manifest(d) for d in manifest_digests(one))
    assert not any(store.has_blob(d) for d in blob_digests(one))
    assert store.get_tag(REGISTRY, "two", "1") is not None and all(store.has_blob(d) for d in blob_digests(two))


def test_rm_keeps_what_another_tag_or_a_recording_needs(store, images):
    one, two = images
    store.set_tag(REGISTRY, "mirror-of-one", "1", one.top.digest)  # the same image under another name
    result = remove(store, store.directory, [ref("one:1")])
    assert result.tags == [f"{REGISTRY}/one:1"] and result.manifests == [] and result.blobs == []
    assert set(result.kept) == manifest_digests(one)
    assert all(store.has_blob(d) for d in blob_digests(one))

    recording = Recording.open(store.directory, "lab")
    recording.images["x"] = image_from_store(store, REGISTRY, "two", "1")
    recording.save()
    result = remove(store, store.directory, [ref("two:1")])
    assert result.blobs == [] and set(result.kept) == manifest_digests(two)
    assert all(store.has_blob(d) for d in blob_digests(two))


def test_rm_by_digest_drops_every_tag_naming_it(store, images):
    one, _ = images
    store.set_tag(REGISTRY, "one", "latest", one.top.digest)
    result = remove(store, store.directory, [ref(f"one@{one.top.digest}")])
    assert result.tags == [f"{REGISTRY}/one:1", f"{REGISTRY}/one:latest"]
    assert set(result.blobs) == blob_digests(one)


def test_rm_dry_run_changes_nothing_and_a_missing_image_is_named(store, images):
    one, _ = images
    before = len(store.blob_entries())
    result = remove(store, store.directory, [ref("one:1"), ref("nothing:1")], dry_run=True)
    assert set(result.blobs) == blob_digests(one) and result.missing == [f"{REGISTRY}/nothing:1"]
    assert len(store.blob_entries()) == before and store.get_tag(REGISTRY, "one", "1") is not None


# Store scale: eviction consistent at every point, walking only what it evicts, off the event loop


def held_manifests_name_only_held_blobs(store, images) -> bool:
    every = {p.manifest.digest: p for image in images for p in image.platforms}
    return all(
        store.has_blob(b.digest) for digest in store.manifest_digests() if digest in every for b in (every[digest].config, *every[digest].layers)
    )


def test_an_eviction_stopped_midway_changes_nothing(store, images, monkeypatch):
    # A process killed in the middle of evicting a blob: its transaction never committed.
    one, _ = images
    before = store.summary()
    monkeypatch.setattr("hubcache.storage.index.drop_blob", lambda *_: (_ for _ in ()).throw(RuntimeError("killed")))
    victim = store.blob_entry(one.platforms[0].layers[0].digest)
    with pytest.raises(RuntimeError):
        store.evict(victim, set())
    assert store.has_blob(victim.digest) and store.get_tag(REGISTRY, "one", "1") is not None
    assert store.get_manifest(one.platforms[0].manifest.digest) is not None
    assert store.summary() == before


def test_every_slice_of_a_pass_leaves_no_manifest_naming_an_evicted_blob(store, images, monkeypatch):
    monkeypatch.setattr("hubcache.storage.eviction.SLICE_BLOBS", 1)
    evicting = EvictionPass(store, store.directory, limit=0, max_unused=None, in_use=0)
    slices = 0
    while not evicting.done:
        evicting.step()
        slices += 1
        assert held_manifests_name_only_held_blobs(store, images)
        tag = store.get_tag(REGISTRY, "one", "1")
        assert tag is None or all(store.has_blob(b.digest) for p in images[0].platforms for b in (p.config, *p.layers))
    assert slices > 2 and store.summary().blobs == 0


def test_a_pass_reads_the_store_only_as_far_as_it_evicts(tmp_path, monkeypatch):
    s = Store(tmp_path / "cache")
    try:
        for n in range(LOOKAHEAD + 10):
            data = n.to_bytes(4, "big")
            writer = s.blob_writer(digest_of(data))
            writer.write(data)
            writer.close()
            writer.commit()
        looks = []
        original = s.least_recently_used
        monkeypatch.setattr(s, "least_recently_used", lambda *args: looks.append(args) or original(*args))
        result = prune(s, s.directory, limit=s.summary().blob_bytes - 1, in_use=0)
        assert result.blobs == 1 and len(looks) == 1
    finally:
        s.close()


@pytest.fixture
def slice_threads(upkeep, images, monkeypatch) -> list[threading.Thread]:
    """The thread each slice of the addon's eviction passes runs in, in order: the addon holds
    image one, may keep nothing, counts no blob as in use and evicts one blob a slice."""
    tctx, addon = upkeep
    store_image(addon.folder.store, images[0], REGISTRY, "one", "1")
    tctx.configure(addon, cache_size_limit="1")
    monkeypatch.setattr("hubcache.storage.eviction.IN_USE", 0.0)
    monkeypatch.setattr("hubcache.storage.eviction.SLICE_BLOBS", 1)
    threads: list[threading.Thread] = []
    step = EvictionPass.step
    monkeypatch.setattr(EvictionPass, "step", lambda self: threads.append(threading.current_thread()) or step(self))
    return threads


async def test_the_addon_evicts_off_the_event_loop_a_slice_at_a_time(upkeep, images, slice_threads, monkeypatch):
    _, addon = upkeep
    one, _ = images
    monkeypatch.setattr("hubcache.storage.eviction.SLICE_BLOBS", 2)
    result = await addon.evict()
    assert result.blobs == len(blob_digests(one)) and len(slice_threads) >= 3
    assert threading.main_thread() not in slice_threads


def test_a_blob_read_after_the_pass_chose_it_is_spared(store, images, clock):
    one, _ = images
    blobs, _ = store.least_recently_used(None, 100)
    chosen = next(b for b in blobs if b.digest == one.platforms[0].layers[0].digest)
    clock.advance()
    with store.open_blob(chosen.digest):
        pass
    assert store.evict(chosen, set()) is None
    assert store.has_blob(chosen.digest) and store.get_tag(REGISTRY, "one", "1") is not None
    assert store.evict(store.blob_entry(chosen.digest), set()) is not None, "as of its last use, it goes"
    assert not store.has_blob(chosen.digest) and store.get_tag(REGISTRY, "one", "1") is None


async def test_the_addon_evicts_in_one_upkeep_thread_of_its_own(upkeep, images, slice_threads):
    """Every slice of every pass runs in the same thread, not in asyncio's workers (each of which
    would keep its own SQLite connection's pages of the pass)."""
    _, addon = upkeep
    one, two = images
    first = await addon.evict()
    store_image(addon.folder.store, two, REGISTRY, "two", "1")
    second = await addon.evict()
    assert first.blobs == len(blob_digests(one)) and second.blobs == len(blob_digests(two))
    assert len(slice_threads) > 2 * 2 and len(set(slice_threads)) == 1
    assert slice_threads[0].name.startswith("hubcache upkeep")
