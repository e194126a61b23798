"""The store's kept indexes: counts that follow every change, references and tags found by
index, and an older store indexed once when first opened."""

import hashlib
import io
import json
import logging

import diskcache
import pytest

from hubcache.storage.store import Store, TagKind

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(n: int) -> bytes:
    return f"blob {n}".encode()


def manifest(*blobs: bytes) -> bytes:
    config, *layers = blobs
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(b), "size": len(b)} for b in layers],
    }).encode()


def index_of(*bodies: bytes) -> bytes:
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha(b), "size": len(b), "platform": {"os": "linux", "architecture": "amd64"}} for b in bodies],
    }).encode()


def put_blob(store: Store, data: bytes) -> None:
    writer = store.blob_writer(sha(data))
    writer.write(data)
    writer.close()
    writer.commit()


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "cache")
    yield s
    s.close()


def counts(store: Store) -> tuple[int, ...]:
    s = store.summary()
    return s.blobs, s.blob_bytes, s.manifests, s.tags, s.repositories


def test_the_counts_follow_every_change(store):
    put_blob(store, blob(1))
    put_blob(store, blob(2))
    put_blob(store, blob(2))  # a second fill of the same blob counts once
    body = manifest(blob(1), blob(2))
    store.put_manifest(sha(body), OCI_MANIFEST, body)
    store.put_manifest(sha(body), OCI_MANIFEST, body)
    store.set_tag("r", "a", "1", sha(body))
    store.set_tag("r", "a", "1", sha(body))  # re-confirmed: still one tag
    store.set_tag("r", "a", "2", sha(body))
    store.set_tag("r", "b", "1", sha(body))
    store.set_tag("r", "b", "1", sha(body), kind=TagKind.SINGLE)  # not a tag `ls` lists
    assert counts(store) == (2, 12, 1, 3, 2)
    assert store.delete_tag("r", "b", "1")
    assert counts(store) == (2, 12, 1, 2, 1)
    assert store.delete_tag("r", "a", "1") and not store.delete_tag("r", "a", "1")
    assert counts(store) == (2, 12, 1, 1, 1)
    assert store.delete_manifest(sha(body))
    assert store.delete_blob(sha(blob(1))) and not store.delete_blob(sha(blob(1)))
    assert counts(store) == (1, 6, 0, 1, 1)
    assert store.users(sha(blob(2)), blob=True) == [], "a dropped manifest's references go with it"


def test_references_and_tags_are_found_by_index(store):
    one, two = manifest(blob(1), blob(2)), manifest(blob(3), blob(2))
    top = index_of(one, two)
    for body, media_type in [(one, OCI_MANIFEST), (two, OCI_MANIFEST), (top, OCI_INDEX)]:
        store.put_manifest(sha(body), media_type, body)
    store.set_tag("r", "app", "1", sha(top))
    store.set_tag("r", "app", "one", sha(one))
    assert sorted(store.users(sha(blob(2)), blob=True)) == sorted([sha(one), sha(two)])
    assert store.users(sha(one), blob=False) == [sha(top)]
    assert sorted(store.named(sha(top), blob=False)) == sorted([sha(one), sha(two)])
    assert store.tags_naming(sha(one)) == [("r", "app", "one")]


def test_a_page_of_tags_starts_after_the_last_one_shown(store):
    for registry, repository, tag in [("q", "z", "1"), ("r", "a", "1"), ("r", "a", "2"), ("r", "b", "1"), ("s", "a", "1")]:
        store.set_tag(registry, repository, tag, sha(b"m"))
    names = [key for key, _ in store.tag_page(limit=2)]
    assert names == [("q", "z", "1"), ("r", "a", "1")]
    assert [key for key, _ in store.tag_page(names[-1], limit=2)] == [("r", "a", "2"), ("r", "b", "1")]
    assert [key for key, _ in store.tag_page(registry="r", match=lambda r, n, t: t == "1")] == [("r", "a", "1"), ("r", "b", "1")]


def test_an_older_store_is_indexed_once_when_first_opened(tmp_path, caplog):
    # Written as hubcache wrote stores before it kept indexes: diskcache keys only.
    folder = tmp_path / "cache"
    body = manifest(blob(1), blob(2))
    old = diskcache.Cache(str(folder / "content"))
    old.set(("blob", sha(blob(1))), io.BytesIO(blob(1)), read=True)  # a blob is a file
    old.set(("blob", sha(blob(2))), io.BytesIO(blob(2)), read=True)
    old.set(("manifest", sha(body)), (OCI_MANIFEST, body))
    old.set(("tag", "r", "app", "1"), (sha(body), 0.0))
    old.set(("single-tag", "r", "app", "1"), (sha(body), 0.0))
    old.close()
    with caplog.at_level(logging.INFO):
        store = Store(folder)
    try:
        assert counts(store) == (2, 12, 1, 1, 1)
        assert store.users(sha(blob(1)), blob=True) == [sha(body)]
        assert [key for key, _ in store.tags()] == [("r", "app", "1")]
        assert "indexing the store once for this version of hubcache: 5 entries" in caplog.text
        # Progress at every tenth of the entries (here: each one), the last line when done.
        progress = [r.message for r in caplog.records if r.message.startswith("hubcache: indexing the store: ")]
        assert progress == [f"hubcache: indexing the store: {n} of 5 entries ({n * 20} %)" for n in (1, 2, 3, 4)]
        assert "indexed the store in" in caplog.text
    finally:
        store.close()
    caplog.clear()
    again = Store(folder)
    try:
        assert counts(again) == (2, 12, 1, 1, 1) and "indexing" not in caplog.text, "once"
    finally:
        again.close()
