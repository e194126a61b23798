"""Recordings: the model and its file, and the Recorder addon fed by the cache (taddons/tflow)."""

from __future__ import annotations

import pytest
import yaml
from mitmproxy import exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils

from hubcache.cache.recorder import Recorder
from hubcache.storage import eviction as upkeep
from hubcache.storage.eviction import Upkeep
from hubcache.storage.recordings import Recording, RecordingError, image_from_store, names, pinned
from support.addons import CacheAddons
from support.fill import store_image
from support.images import build_image

HUB = "registry-1.docker.io"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_image(
        tmp_path_factory.mktemp("layout"), "1", [100_000, 2_000], seed="rec", platforms=[("linux", "amd64"), ("linux", "arm64", "v8")]
    )


@pytest.fixture
async def env(tmp_path, image):
    addons = CacheAddons()
    recorder = Recorder(addons.folder)
    with taddons.context(Proxyserver(), *addons.addons(), recorder) as tctx:
        tctx.options.update(cache_dir=str(tmp_path), tag_freshness=3600)
        store_image(addons.store, image, "docker.io", "library/rec", "1")
        yield tctx, addons, recorder
        addons.folder.done()


async def pull(cache: CacheAddons, recorder: Recorder, path: str, method: str = "GET") -> http.HTTPFlow:
    """A request answered from the store, then seen by the recorder, as in the addon chain."""
    req = tutils.treq(host=HUB, port=443, scheme=b"https", method=method.encode(), path=path.encode(), headers=http.Headers(), content=b"")
    f = tflow.tflow(req=req)
    f.client_conn.sni = HUB
    await cache.request(f)
    assert f.response and f.response.status_code == 200
    await recorder.response(f)
    return f


async def test_a_pull_is_recorded_with_its_platform(env, image, tmp_path):
    tctx, cache, recorder = env
    tctx.configure(recorder, record="ci")
    amd64 = image.platform("linux/amd64")
    await pull(cache, recorder, "/v2/library/rec/manifests/1")
    await pull(cache, recorder, f"/v2/library/rec/manifests/{amd64.manifest.digest}")

    data = yaml.safe_load((tmp_path / "recordings" / "ci.yaml").read_text())
    (ref,) = data["images"]
    assert ref == "docker.io/library/rec:1"
    entry = data["images"][ref]
    assert entry["digest"] == image.index_digest
    (platform,) = entry["manifests"]
    assert (platform["digest"], platform["platform"]) == (amd64.manifest.digest, "linux/amd64")
    assert [b["digest"] for b in platform["blobs"]] == [amd64.config.digest, *(layer.digest for layer in amd64.layers)]
    recording = Recording.open(tmp_path, "ci")
    assert recording.missing(recorder.folder.store) == []
    assert recording.total_size() == sum(b.size for b in (amd64.config, *amd64.layers))
    assert names(tmp_path) == ["ci"]


async def test_a_head_then_a_get_by_digest_is_one_image(env, image, tmp_path):
    """dockerd resolves the tag with HEAD and fetches the index by digest."""
    tctx, cache, recorder = env
    tctx.configure(recorder, record="ci")
    arm64 = image.platform("linux/arm64/v8")
    await pull(cache, recorder, "/v2/library/rec/manifests/1", method="HEAD")
    await pull(cache, recorder, f"/v2/library/rec/manifests/{image.index_digest}")
    await pull(cache, recorder, f"/v2/library/rec/manifests/{arm64.manifest.digest}")
    recording = Recording.open(tmp_path, "ci")
    assert list(recording.images) == ["docker.io/library/rec:1"]
    assert list(recording.images["docker.io/library/rec:1"].manifests) == [arm64.manifest.digest]


async def test_a_pull_by_digest_is_an_image_of_its_own(env, image, tmp_path):
    tctx, cache, recorder = env
    tctx.configure(recorder, record="ci")
    amd64 = image.platform("linux/amd64")
    await pull(cache, recorder, f"/v2/library/rec/manifests/{amd64.manifest.digest}")
    recording = Recording.open(tmp_path, "ci")
    name = f"docker.io/library/rec@{amd64.manifest.digest}"
    assert list(recording.images) == [name]
    assert len(recording.images[name].blobs()) == 3


async def test_nothing_is_recorded_without_the_option(env, tmp_path):
    _, cache, recorder = env
    await pull(cache, recorder, "/v2/library/rec/manifests/1")
    assert not (tmp_path / "recordings").exists()


async def test_a_bad_recording_name_is_refused(env):
    tctx, _, recorder = env
    for bad in ("../escape", ".hidden", "a/b"):
        with pytest.raises(exceptions.OptionsError, match="invalid recording name"):
            tctx.configure(recorder, record=bad)


def test_the_file_round_trips_and_reports_what_the_store_lacks(tmp_path, image):
    from hubcache.storage.store import Store

    store = Store(tmp_path / "store")
    try:
        store_image(store, image, "docker.io", "library/rec", "1")
        recording = Recording.open(tmp_path, "lab")
        recording.images["docker.io/library/rec:1"] = image_from_store(store, "docker.io", "library/rec", "1")
        recording.save()
        again = Recording.open(tmp_path, "lab")
        assert again.images == recording.images and again.digests() == recording.digests()
        assert again.missing(store) == []
        empty = Store(tmp_path / "empty")
        try:
            assert set(again.missing(empty)) == again.digests()
        finally:
            empty.close()
    finally:
        store.close()


def test_an_unreadable_file_is_one_clear_error(tmp_path):
    (tmp_path / "recordings").mkdir()
    (tmp_path / "recordings" / "bad.yaml").write_text("images: [unclosed")
    with pytest.raises(RecordingError, match="not a readable recording"):
        Recording.open(tmp_path, "bad")


def test_referrers_are_noted_on_their_image_and_survive_a_reload(tmp_path):
    import hashlib
    import json

    from hubcache.storage.store import Store

    def digest(body: bytes) -> str:
        return "sha256:" + hashlib.sha256(body).hexdigest()

    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + "1" * 64, "size": 3}
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "2" * 64, "size": 2}
    oci = "application/vnd.oci.image.manifest.v1+json"
    image = json.dumps({"schemaVersion": 2, "mediaType": oci, "config": config, "layers": [layer]}).encode()
    sbom_layer = {"mediaType": "application/spdx+json", "digest": "sha256:" + "3" * 64, "size": 5}
    subject = {"mediaType": oci, "digest": digest(image), "size": len(image)}
    sbom = json.dumps({"schemaVersion": 2, "mediaType": oci, "artifactType": "application/spdx+json", "config": config,
                       "layers": [sbom_layer], "subject": subject}).encode()
    sig = json.dumps({"schemaVersion": 2, "mediaType": oci, "config": config, "layers": [layer]}).encode()
    store = Store(tmp_path / "store")
    recording = Recording.open(tmp_path, "lab")
    assert recording.note_manifest(store, "docker.io", "library/app", "1", digest(image), oci, image)
    assert recording.note_manifest(store, "docker.io", "library/app", digest(sbom), digest(sbom), oci, sbom)
    sig_tag = digest(image).replace(":", "-") + ".sig"
    assert recording.note_manifest(store, "docker.io", "library/app", sig_tag, digest(sig), oci, sig)
    assert list(recording.images) == ["docker.io/library/app:1"], "referrers are no images of their own"
    recording.save()
    loaded = Recording.load(recording.path).images["docker.io/library/app:1"]
    assert {r.digest: (r.subject, r.artifact_type, r.tag) for r in loaded.referrers.values()} == {
        digest(sbom): (digest(image), "application/spdx+json", ""),
        digest(sig): (digest(image), "", sig_tag),
    }
    assert sbom_layer["digest"] in loaded.blobs() and digest(sbom) in loaded.manifest_digests()


# What a recording pins: what the operator recorded, not what any client pulled


async def evict_to(tctx, upkeep_addon: Upkeep, limit: str) -> None:
    tctx.configure(upkeep_addon, cache_size_limit=limit)
    assert await upkeep_addon.evict() is not None


@pytest.fixture
def upkeep_addon(env, monkeypatch):
    monkeypatch.setattr(upkeep, "IN_USE", 0)  # the test's blobs were stored just now
    tctx, _, recorder = env
    addon = Upkeep(recorder.folder)
    tctx.master.addons.add(addon)
    return addon


async def test_what_clients_pull_is_recorded_but_evicted_past_the_limit(env, image, tmp_path, upkeep_addon):
    tctx, cache, recorder = env
    tctx.configure(recorder, record="ci")
    amd64 = image.platform("linux/amd64")
    await pull(cache, recorder, "/v2/library/rec/manifests/1")
    await pull(cache, recorder, f"/v2/library/rec/manifests/{amd64.manifest.digest}")
    recording = Recording.open(tmp_path, "ci")
    assert not recording.images["docker.io/library/rec:1"].pinned
    assert "pinned: false" in recording.path.read_text()
    assert pinned(tmp_path) == set()
    await evict_to(tctx, upkeep_addon, "1")
    store = recorder.folder.store
    assert store.blob_entries() == [], "cache_size_limit holds: nothing a client pulled is pinned"
    assert set(Recording.open(tmp_path, "ci").missing(store)) >= set(recording.images["docker.io/library/rec:1"].blobs())


async def test_record_pins_pins_what_is_recorded(env, image, tmp_path, upkeep_addon):
    tctx, cache, recorder = env
    tctx.configure(recorder, record="lab", record_pins=True)
    amd64 = image.platform("linux/amd64")
    await pull(cache, recorder, "/v2/library/rec/manifests/1")
    await pull(cache, recorder, f"/v2/library/rec/manifests/{amd64.manifest.digest}")
    recording = Recording.open(tmp_path, "lab")
    assert recording.images["docker.io/library/rec:1"].pinned
    await evict_to(tctx, upkeep_addon, "1")
    kept = {b.digest for b in recorder.folder.store.blob_entries()}
    assert kept == set(recording.images["docker.io/library/rec:1"].blobs())


async def test_a_clients_pull_never_changes_a_pinned_image(env, image, tmp_path):
    tctx, cache, recorder = env
    tctx.configure(recorder, record="lab", record_pins=True)
    amd64, arm64 = image.platform("linux/amd64"), image.platform("linux/arm64/v8")
    await pull(cache, recorder, "/v2/library/rec/manifests/1")
    await pull(cache, recorder, f"/v2/library/rec/manifests/{amd64.manifest.digest}")
    tctx.configure(recorder, record_pins=False)
    await pull(cache, recorder, "/v2/library/rec/manifests/1")
    await pull(cache, recorder, f"/v2/library/rec/manifests/{arm64.manifest.digest}")
    recording = Recording.open(tmp_path, "lab")
    operator = recording.images["docker.io/library/rec:1"]
    assert operator.pinned and list(operator.manifests) == [amd64.manifest.digest]
    client = recording.images[f"docker.io/library/rec@{arm64.manifest.digest}"]
    assert not client.pinned
    assert pinned(tmp_path) == recording.digests(pinned_only=True) == {*operator.manifest_digests(), *operator.blobs()}
    assert arm64.layers[0].digest not in pinned(tmp_path)


def test_an_image_a_client_pulled_is_pinned_once_the_operator_records_it(tmp_path, image):
    from hubcache.storage.store import Store

    store = Store(tmp_path / "store")
    try:
        store_image(store, image, "docker.io", "library/rec", "1")
        recording = Recording.open(tmp_path, "lab")
        assert recording.note_manifest(store, "docker.io", "library/rec", "1", image.index_digest, image.top.media_type, None, pin=False)
        assert pinned(tmp_path) == set()
        assert recording.note_manifest(store, "docker.io", "library/rec", "1", image.index_digest, image.top.media_type, None, pin=True)
        assert recording.images["docker.io/library/rec:1"].pinned
    finally:
        store.close()


def test_a_client_pulling_a_moved_tag_leaves_the_pinned_image(tmp_path, image):
    from hubcache.storage.store import Store

    store = Store(tmp_path / "store")
    try:
        recording = Recording.open(tmp_path, "lab")
        assert recording.note_manifest(store, "docker.io", "library/rec", "1", image.index_digest, image.top.media_type, None, pin=True)
        moved = "sha256:" + "b" * 64
        assert not recording.note_manifest(store, "docker.io", "library/rec", "1", moved, image.top.media_type, None, pin=False)
        assert recording.images["docker.io/library/rec:1"].digest == image.index_digest
    finally:
        store.close()


def test_a_recording_from_before_pins_pins_everything(tmp_path):
    (tmp_path / "recordings").mkdir()
    digest = "sha256:" + "a" * 64
    entry = {"registry": "docker.io", "repository": "library/old", "reference": "1", "digest": digest,
             "media_type": "application/vnd.oci.image.manifest.v1+json", "manifests": []}
    (tmp_path / "recordings" / "old.yaml").write_text(yaml.safe_dump({"name": "old", "images": {"docker.io/library/old:1": entry}}))
    assert pinned(tmp_path) == {digest}


def test_what_import_brings_is_pinned(tmp_path, image):
    from hubcache.storage.bundle import export, import_bundle
    from hubcache.storage.store import Store

    store = Store(tmp_path / "connected")
    try:
        store_image(store, image, "docker.io", "library/rec", "1")
        carried = image_from_store(store, "docker.io", "library/rec", "1")
        export(store, [carried], tmp_path / "lab.tar", "lab")
    finally:
        store.close()
    site = tmp_path / "site"
    store = Store(site)
    try:
        import_bundle(store, tmp_path / "lab.tar", site)
    finally:
        store.close()
    assert Recording.open(site, "lab").images["docker.io/library/rec:1"].pinned
    assert pinned(site) == {*carried.manifest_digests(), *carried.blobs()}
