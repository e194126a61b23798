"""Export and import of OCI image layout bundles, on real stores and test images (no processes)."""

from __future__ import annotations

import bz2
import io
import json
import os
import tarfile
import tracemalloc

import pytest

from hubcache.registry.manifests import Descriptor
from hubcache.storage import bundle
from hubcache.storage.bundle import BundleError, PartlyImported, export, import_bundle
from hubcache.storage.recordings import Recording, image_from_store
from hubcache.storage.store import Store
from support.bundles import bomb, header_bomb, json_flood, many_images
from support.fill import store_image
from support.images import build_image

REGISTRY = "registry.example.test"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    layout = tmp_path_factory.mktemp("layout")
    return build_image(layout, "1", [300_000, 5_000], seed="bundle", platforms=[("linux", "amd64"), ("linux", "arm64")])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("single"), "1", [200_000], seed="single", format="docker")


@pytest.fixture
def stores(tmp_path):
    opened = []

    def open_store(name: str) -> Store:
        store = Store(tmp_path / name)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def everything(image, platforms=None):
    chosen = [p for p in image.platforms if platforms is None or p.platform in platforms]
    manifests = [p.manifest.digest for p in chosen] + ([image.index_digest] if image.index else [])
    blobs = [b.digest for p in chosen for b in (p.config, *p.layers)]
    return manifests, blobs


def temp_files(store: Store) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(store.directory / "tmp") for f in files]


def exported(stores, image, tmp_path, platforms=None, repository="test/multi"):
    source = stores("source")
    store_image(source, image, REGISTRY, repository, "1", platforms)
    bundle = tmp_path / "bundle.tar"
    summary = export(source, [image_from_store(source, REGISTRY, repository, "1")], bundle, recording="lab")
    return source, bundle, summary


def test_export_import_round_trip(stores, image, tmp_path):
    _, bundle, summary = exported(stores, image, tmp_path)
    manifests, blobs = everything(image)
    assert (summary.manifests, summary.blobs) == (len(manifests), len(blobs))
    umask = os.umask(0)
    os.umask(umask)
    assert bundle.stat().st_mode & 0o777 == 0o666 & ~umask, "a bundle is as readable as any file the user writes"

    target = stores("target")
    progress = []
    result = import_bundle(target, bundle, cache_dir=target.directory, progress=progress.append)
    assert result.images == [f"{REGISTRY}/test/multi:1"]
    assert (result.manifests, result.blobs, result.already_held) == (len(manifests), len(blobs), 0)
    with tarfile.open(bundle) as tar:
        assert sum(progress) == sum(m.size for m in tar if m.name != "oci-layout"), "each member of the layout is read once"
    assert target.get_tag(REGISTRY, "test/multi", "1").digest == image.index_digest
    assert target.get_tag(REGISTRY, "test/multi", "1").checked == 0, "an imported tag was never confirmed upstream"
    assert all(target.get_manifest(d) for d in manifests)
    for digest in blobs:
        with target.open_blob(digest) as f:
            assert f.read() == (image.layout_dir / "blobs/sha256" / digest[7:]).read_bytes()
    recording = Recording.open(target.directory, "lab")
    assert recording.missing(target) == [] and len(recording.digests()) == len(manifests) + len(blobs)
    assert all(target.linked(REGISTRY, "test/multi", d) for d in manifests + blobs)
    assert target.visibility(REGISTRY, "test/multi") is True
    assert temp_files(target) == []


def test_the_bundle_is_a_standard_oci_layout(stores, image, tmp_path):
    _, bundle, _ = exported(stores, image, tmp_path)
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
        layout = json.load(tar.extractfile("oci-layout"))
        index = json.load(tar.extractfile("index.json"))
    assert layout == {"imageLayoutVersion": "1.0.0"}
    (entry,) = index["manifests"]
    assert entry["digest"] == image.index_digest
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == f"{REGISTRY}/test/multi:1"
    manifests, blobs = everything(image)
    assert {f"blobs/sha256/{d[7:]}" for d in manifests + blobs} | {"oci-layout", "index.json"} == names


def test_a_private_image_stays_private(stores, image, tmp_path):
    source = stores("source")
    store_image(source, image, REGISTRY, "test/multi", "1", public=False)
    export(source, [image_from_store(source, REGISTRY, "test/multi", "1")], tmp_path / "b.tar")
    target = stores("target")
    import_bundle(target, tmp_path / "b.tar")
    assert target.visibility(REGISTRY, "test/multi") is False


def test_a_partial_index_exports_the_platforms_held(stores, image, tmp_path):
    _, bundle, summary = exported(stores, image, tmp_path, platforms=["linux/arm64"])
    assert summary.manifests == 2  # the index and the one platform
    target = stores("target")
    import_bundle(target, bundle)
    arm64, amd64 = image.platform("linux/arm64"), image.platform("linux/amd64")
    assert target.get_manifest(arm64.manifest.digest) and not target.get_manifest(amd64.manifest.digest)


def test_a_docker_image_without_index(stores, single, tmp_path):
    _, bundle, _ = exported(stores, single, tmp_path, repository="library/single")
    target = stores("target")
    result = import_bundle(target, bundle)
    assert result.images == [f"{REGISTRY}/library/single:1"]
    assert target.get_manifest(single.top.digest).media_type == single.top.media_type


def test_export_refuses_when_the_cache_lacks_a_blob(stores, image, tmp_path):
    source = stores("source")
    store_image(source, image, REGISTRY, "test/multi", "1")
    wanted = image_from_store(source, REGISTRY, "test/multi", "1")
    platform = wanted.manifests[image.platforms[0].manifest.digest]
    platform.blobs.append(Descriptor("sha256:" + "0" * 64, 1))
    with pytest.raises(BundleError, match=r"lacks 1 of the needed items, e\.g\. blob sha256:000"):
        export(source, [wanted], tmp_path / "out.tar")
    assert list(tmp_path.glob("*out.tar*")) == []


def test_export_refuses_a_blob_that_rotted_on_disk(stores, image, tmp_path):
    source = stores("source")
    store_image(source, image, REGISTRY, "test/multi", "1")
    layer = image.platforms[0].layers[0].digest
    with source.open_blob(layer) as f:
        path = f.name
    with open(path, "r+b") as f:
        f.write(b"X")
    with pytest.raises(BundleError, match="does not match"):
        export(source, [image_from_store(source, REGISTRY, "test/multi", "1")], tmp_path / "out.tar")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert not (tmp_path / "out.tar").exists()


def assert_untouched(store: Store, image) -> None:
    manifests, blobs = everything(image)
    assert store.get_tag(REGISTRY, "test/multi", "1") is None
    assert not any(store.get_manifest(d) for d in manifests)
    assert not any(store.has_blob(d) for d in blobs)
    assert temp_files(store) == []
    assert not (store.directory / "recordings").exists()


def corrupt(bundle, tmp_path, digest):
    """A copy of the bundle with one byte of a blob changed (same size)."""
    out = tmp_path / "corrupt.tar"
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith(digest[7:]):
                data = bytes([data[0] ^ 1]) + data[1:]
            dst.addfile(member, io.BytesIO(data))
    return out


def test_a_corrupt_blob_is_refused_and_nothing_changes(stores, image, tmp_path):
    _, bundle, _ = exported(stores, image, tmp_path)
    bad = corrupt(bundle, tmp_path, image.platforms[1].layers[1].digest)
    target = stores("target")
    with pytest.raises(BundleError, match="corrupt"):
        import_bundle(target, bad, cache_dir=target.directory)
    assert_untouched(target, image)


def test_a_truncated_bundle_is_refused_and_nothing_changes(stores, image, tmp_path):
    _, bundle, _ = exported(stores, image, tmp_path)
    with tarfile.open(bundle) as tar:
        largest = max(tar.getmembers(), key=lambda m: m.size)
    target = stores("target")
    for end, error in [(largest.offset_data + largest.size // 2, "not a readable tar"), (largest.offset, "is missing")]:
        cut = tmp_path / "cut.tar"
        cut.write_bytes(bundle.read_bytes()[:end])  # within a blob, or between two members
        with pytest.raises(BundleError, match=error):
            import_bundle(target, cut, cache_dir=target.directory)
        assert_untouched(target, image)


def test_a_bundle_missing_a_layer_is_refused(stores, image, tmp_path):
    _, bundle, _ = exported(stores, image, tmp_path)
    missing = image.platforms[0].layers[0].digest
    out = tmp_path / "short.tar"
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for member in src:
            if not member.name.endswith(missing[7:]):
                dst.addfile(member, src.extractfile(member))
    target = stores("target")
    with pytest.raises(BundleError, match=f"blob {missing} is missing"):
        import_bundle(target, out, cache_dir=target.directory)
    assert_untouched(target, image)


def test_an_entry_without_a_full_name_is_refused(stores, image, tmp_path):
    target = stores("target")
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:
        tar.add(image.layout_dir, arcname=".")  # the test layout names its image only "1"
    with pytest.raises(BundleError, match="not a full image reference"):
        import_bundle(target, tmp_path / "plain.tar")
    assert_untouched(target, image)


@pytest.mark.parametrize("annotations", [["x"], {"org.opencontainers.image.ref.name": 5}, "a"])
def test_an_entry_whose_annotations_are_not_strings_is_refused_in_one_line(stores, image, tmp_path, annotations):
    _, bundle, _ = exported(stores, image, tmp_path)
    odd = tmp_path / "odd.tar"
    with tarfile.open(bundle) as src, tarfile.open(odd, "w") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.lstrip("./") == "index.json":
                index = json.loads(data)
                index["manifests"][0]["annotations"] = annotations
                data = json.dumps(index).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    target = stores("target")
    with pytest.raises(Exception) as refused:  # any: which one is what is tested
        import_bundle(target, odd, cache_dir=target.directory)
    assert refused.type is BundleError and "its annotations are not an object of strings" in str(refused.value), refused.type
    assert_untouched(target, image)


def test_import_skips_blobs_already_held(stores, image, tmp_path):
    _, bundle, _ = exported(stores, image, tmp_path)
    target = stores("target")
    import_bundle(target, bundle)
    again = import_bundle(target, bundle)
    assert again.blobs == 0 and again.already_held == len(everything(image)[1])


def test_not_a_tar_file(stores, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello" * 1000)
    with pytest.raises(BundleError, match="not a readable tar") as refused:
        import_bundle(stores("target"), junk)
    assert "\n" not in str(refused.value), "one line, whatever tarfile's reasons"


def without(bundle, tmp_path, digest):
    """A copy of the bundle that lacks one blob."""
    out = tmp_path / "without.tar"
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for member in src:
            if not member.name.endswith(digest[7:]):
                dst.addfile(member, src.extractfile(member))
    return out


def test_a_bundle_opens_no_digest_it_does_not_carry(stores, image, tmp_path):
    """A bundle naming, in a public repository of its own, a layer the store holds for a private
    one: the import goes through on the held layer, but never ties it to the bundle's repository,
    so it stays out of anonymous reach there."""
    layer = image.platforms[0].layers[0].digest
    target = stores("target")
    store_image(target, image, REGISTRY, "acme/secret", "1", public=False)
    _, bundle, _ = exported(stores, image, tmp_path, repository="evil/open")
    import_bundle(target, without(bundle, tmp_path, layer))
    assert not target.linked(REGISTRY, "evil/open", layer)
    assert target.linked(REGISTRY, "evil/open", image.platforms[0].layers[1].digest), "what it carried is its own"
    assert target.linked(REGISTRY, "acme/secret", layer)


def unmarked(bundle, tmp_path):
    """A copy of the bundle whose index says nothing of visibility, as skopeo's or crane's."""
    out = tmp_path / "unmarked.tar"
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name == "index.json":
                index = json.loads(data)
                for entry in index["manifests"]:
                    del entry["annotations"]["io.hubcache.public"]
                data = json.dumps(index).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out


def test_a_bundle_without_the_public_mark_leaves_visibility_unknown(stores, image, tmp_path):
    """Unknown stays unknown: the repository is not marked public, so the probe still runs for
    what is cached through it later (Access.learn), and online each client is checked upstream."""
    _, bundle, _ = exported(stores, image, tmp_path)
    target = stores("target")
    import_bundle(target, unmarked(bundle, tmp_path))
    assert target.visibility(REGISTRY, "test/multi") is None
    assert target.visibility_checked(REGISTRY, "test/multi") is None, "nothing spares the probe"
    assert target.imported(REGISTRY, "test/multi"), "offline, the operator's import serves it"
    assert target.get_tag(REGISTRY, "test/multi", "1").digest == image.index_digest


def test_a_marked_public_bundle_makes_an_unknown_repository_public(stores, image, tmp_path):
    _, bundle, _ = exported(stores, image, tmp_path)
    target = stores("target")
    import_bundle(target, bundle)
    assert target.visibility(REGISTRY, "test/multi") is True and not target.imported(REGISTRY, "test/multi")


def test_an_unknown_visibility_is_exported_unmarked(stores, image, tmp_path):
    _, bundle, _ = exported(stores, image, tmp_path)
    middle = stores("middle")
    import_bundle(middle, unmarked(bundle, tmp_path))
    again = tmp_path / "again.tar"
    export(middle, [image_from_store(middle, REGISTRY, "test/multi", "1")], again)
    with tarfile.open(again) as tar:
        (entry,) = json.load(tar.extractfile("index.json"))["manifests"]
    assert "io.hubcache.public" not in entry["annotations"], "never exported as public on trust"


def test_a_bundle_never_opens_a_repository_known_private(stores, image, tmp_path):
    target = stores("target")
    store_image(target, image, REGISTRY, "test/multi", "1", public=False)
    _, bundle, _ = exported(stores, image, tmp_path)  # marked public
    import_bundle(target, bundle)
    assert target.visibility(REGISTRY, "test/multi") is False


# hostile bundles: a bomb, floods, and members larger than declared cost nothing


MiB = 1024 * 1024


def room(free: int):
    """A free-space function for import_bundle: `free` bytes, whatever the disk really has."""
    return lambda folder: free


def test_a_bomb_is_refused_before_a_byte_of_it_is_written(stores, tmp_path):
    """A few hundred bytes of bz2 that inflate to 256 MiB of zeros, under their true digest and
    declared with their true size: more than the cache folder has room for, so refused at its
    header; nothing of it is read or written."""
    path = tmp_path / "bomb.tar.bz2"
    layer = bomb(path, 256 * MiB)
    assert path.stat().st_size < 4096
    target = stores("target")
    progress = []
    with pytest.raises(BundleError, match=r"its blobs take \d+ bytes; the cache folder has 100663296 bytes free"):
        import_bundle(target, path, cache_dir=target.directory, progress=progress.append, free_space=room(96 * MiB))
    assert sum(progress) == 0, "no member was read"
    assert not target.has_blob(layer) and temp_files(target) == []


def test_a_bundle_that_fits_in_the_free_space_imports(stores, tmp_path):
    """The same kind of file is a valid image: it loads when the folder has room for it (and 64
    MiB to spare), and is refused when it lacks a MiB."""
    path = tmp_path / "zeros.tar.bz2"
    layer = bomb(path, 16 * MiB)
    target = stores("target")
    with pytest.raises(BundleError, match="the cache folder has"):
        import_bundle(target, path, free_space=room(64 * MiB + 15 * MiB))
    assert temp_files(target) == []
    import_bundle(target, path, free_space=room(64 * MiB + 17 * MiB))
    assert target.has_blob(layer)


def test_a_member_larger_than_its_descriptor_is_refused_unread(stores, tmp_path):
    path = tmp_path / "bomb.tar.bz2"
    layer = bomb(path, 16 * MiB, declared=1000)
    target = stores("target")
    progress = []
    with pytest.raises(BundleError, match=f"blob {layer} has 16777216 bytes, not 1000"):
        import_bundle(target, path, progress=progress.append)
    assert sum(progress) < 4096, "the member was never read"
    assert not target.has_blob(layer) and temp_files(target) == []


def test_a_flood_of_json_blobs_no_manifest_names_is_refused_in_bounded_memory(stores, tmp_path):
    """10 000 small JSON blobs beside a valid image: refused with one line, none of them read,
    memory bounded (no blob kept), the store unchanged."""
    path = tmp_path / "flood.tar.gz"
    json_flood(path, 10_000, 16 * 1024)
    target = stores("target")
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=r"^blobs/sha256/[0-9a-f]{64}: no manifest of the bundle names this blob$"):
            import_bundle(target, path, cache_dir=target.directory)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * MiB, f"{peak} bytes allocated at the peak"  # the 10 000 blobs alone are 160 MiB
    assert target.get_tag(REGISTRY, "evil/flood", "1") is None and target.manifest_digests() == []
    assert temp_files(target) == [] and not (target.directory / "recordings").exists()


def test_a_compressed_bundle_imports(stores, image, tmp_path):
    """The legitimate path: a bundle compressed with bz2 (as people carry them) loads whole."""
    _, bundle, _ = exported(stores, image, tmp_path)
    compressed = tmp_path / "bundle.tar.bz2"
    compressed.write_bytes(bz2.compress(bundle.read_bytes()))
    target = stores("target")
    result = import_bundle(target, compressed)
    manifests, blobs = everything(image)
    assert (result.manifests, result.blobs) == (len(manifests), len(blobs))
    assert all(target.has_blob(d) for d in blobs)


def test_a_bundle_of_more_members_than_the_bound_is_refused_unread(stores, tmp_path, monkeypatch):
    """The members are listed before any is read: a file of more than MAX_MEMBERS (here 40) is
    refused at the header over the bound, nothing of it read or stored; one within it loads."""
    monkeypatch.setattr(bundle, "MAX_MEMBERS", 40)
    within, over = tmp_path / "within.tar", tmp_path / "over.tar"
    many_images(within, 10, extra_members=18)  # 10 manifests, 10 layers, a config, index.json: 40
    images = many_images(over, 10, extra_members=19)
    assert len(import_bundle(stores("legitimate"), within).images) == 10
    target = stores("target")
    progress = []
    with pytest.raises(BundleError, match=r"over.tar: more than 40 members; not a bundle hubcache reads$"):
        import_bundle(target, over, progress=progress.append)
    assert sum(progress) == 0, "no member was read"
    assert target.manifest_digests() == [] and not any(target.has_blob(layer) for _, _, layer in images)
    assert temp_files(target) == []


def test_a_commit_that_fails_midway_leaves_whole_images_only(stores, tmp_path, monkeypatch):
    """Images are stored whole in each transaction: when storing the second one's tag fails (a full
    disk), the first is there whole, and nothing of the second (its manifest, its own layer) or
    of the third is kept."""
    monkeypatch.setattr(bundle, "COMMIT_ENTRIES", 1)  # one image per transaction
    path = tmp_path / "many.tar"
    (first, second, third) = many_images(path, 3)
    set_tag = Store.set_tag

    def full_disk(store, registry, name, tag, *args, **kwargs):
        if tag == second[0]:
            raise OSError(28, "No space left on device")
        set_tag(store, registry, name, tag, *args, **kwargs)

    monkeypatch.setattr(Store, "set_tag", full_disk)
    target = stores("target")
    try:
        import_bundle(target, path)
        pytest.fail("imported on a full disk")
    except PartlyImported as e:
        assert str(e) == "No space left on device; 1 of 3 images were stored whole, the rest not at all"
        assert e.stored == [f"{REGISTRY}/test/many:{first[0]}"]
    except OSError as e:
        pytest.fail(f"the error does not say which images were kept: {e}")
    tag, manifest, layer = first
    assert target.get_tag(REGISTRY, "test/many", tag).digest == manifest
    assert target.get_manifest(manifest) and target.has_blob(layer)
    for tag, manifest, layer in (second, third):
        assert target.get_tag(REGISTRY, "test/many", tag) is None
        assert target.get_manifest(manifest) is None and not target.has_blob(layer), f"image {tag} is partly stored"
    assert temp_files(target) == []


def test_images_sharing_a_transaction_are_all_stored(stores, tmp_path):
    """The legitimate path: many images per transaction (the config shared by all counted once)."""
    path = tmp_path / "many.tar"
    images = many_images(path, 30)
    target = stores("target")
    summary = import_bundle(target, path)
    assert (len(summary.images), summary.manifests, summary.blobs, summary.already_held) == (30, 30, 31, 0)
    for tag, manifest, layer in images:
        assert target.get_tag(REGISTRY, "test/many", tag).digest == manifest and target.has_blob(layer)
    again = import_bundle(target, path)
    assert (again.manifests, again.blobs, again.already_held) == (30, 0, 31)


@pytest.mark.parametrize("kind", [b"L", b"x"], ids=["gnu-long-name", "pax"])
def test_an_extended_header_claiming_more_than_the_bound_is_refused_unread(stores, tmp_path, kind):
    """A header of a few KB of gzip that claims 64 MiB of long name or pax records: tarfile alone
    reads all of it into memory before the next header (a 625 KB file of xz took 4.3 GB)."""
    path = tmp_path / "headers.tar.gz"
    header_bomb(path, kind, 64 * MiB)
    assert path.stat().st_size < 1 * MiB
    target = stores("target")
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=r"an extended header of 67108864 bytes \(at most 1048576\)") as refused:
            import_bundle(target, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"{peak} bytes held"
    assert "\n" not in str(refused.value), "one line"
    assert temp_files(target) == []
