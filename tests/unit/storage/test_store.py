import os
import sqlite3
import threading
import time

import diskcache
import pytest

from hubcache.registry.protocol import digest_of
from hubcache.storage.store import Store, TagEntry, TagKind

BLOB = os.urandom(200_000)  # large enough that diskcache keeps it in a file
BLOB_DIGEST = digest_of(BLOB)
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
MANIFEST_DIGEST = digest_of(MANIFEST)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "cache")
    yield s
    s.close()


def temp_files(store: Store) -> list[str]:
    root = store.directory / "tmp"
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def fill(store: Store, digest: str, chunks: list[bytes]):
    writer = store.blob_writer(digest)
    for chunk in chunks:
        writer.write(chunk)
    return writer


class TestManifests:
    def test_put_get(self, store):
        assert store.get_manifest(MANIFEST_DIGEST) is None
        store.put_manifest(MANIFEST_DIGEST, OCI_MANIFEST, MANIFEST)
        m = store.get_manifest(MANIFEST_DIGEST)
        assert (m.digest, m.media_type, m.body) == (MANIFEST_DIGEST, OCI_MANIFEST, MANIFEST)

    def test_sha512(self, store):
        digest = digest_of(MANIFEST, "sha512")
        store.put_manifest(digest, OCI_MANIFEST, MANIFEST)
        assert store.get_manifest(digest).body == MANIFEST

    def test_refuses_mismatching_bytes(self, store):
        with pytest.raises(ValueError):
            store.put_manifest(MANIFEST_DIGEST, OCI_MANIFEST, MANIFEST + b" ")
        assert store.get_manifest(MANIFEST_DIGEST) is None

    def test_manifest_is_not_a_blob(self, store):
        store.put_manifest(MANIFEST_DIGEST, OCI_MANIFEST, MANIFEST)
        assert not store.has_blob(MANIFEST_DIGEST)


class TestTags:
    def test_set_get(self, store):
        assert store.get_tag("docker.io", "library/alpine", "latest") is None
        store.set_tag("docker.io", "library/alpine", "latest", MANIFEST_DIGEST)
        entry = store.get_tag("docker.io", "library/alpine", "latest")
        assert entry.digest == MANIFEST_DIGEST
        assert entry.checked > 0

    def test_tags_are_per_registry_repository_and_tag(self, store):
        store.set_tag("docker.io", "library/alpine", "latest", MANIFEST_DIGEST)
        assert store.get_tag("ghcr.io", "library/alpine", "latest") is None
        assert store.get_tag("docker.io", "library/busybox", "latest") is None
        assert store.get_tag("docker.io", "library/alpine", "3") is None

    def test_set_again_moves_the_tag_and_refreshes_checked(self, store):
        store.set_tag("r", "n", "t", "sha256:" + "1" * 64, checked=1000.0)
        before = time.time()
        store.set_tag("r", "n", "t", MANIFEST_DIGEST)
        second = store.get_tag("r", "n", "t")
        assert second.digest == MANIFEST_DIGEST
        assert second.checked >= before


    def test_each_kind_of_client_has_its_own_entry(self, store):
        store.set_tag("r", "n", "t", MANIFEST_DIGEST)
        store.set_tag("r", "n", "t", "sha256:" + "1" * 64, kind=TagKind.SINGLE)
        assert store.get_tag("r", "n", "t").digest == MANIFEST_DIGEST, "a single manifest never re-points the tag"
        assert store.get_tag("r", "n", "t", TagKind.SINGLE).digest == "sha256:" + "1" * 64
        assert [key for key, _ in store.tags()] == [("r", "n", "t")] and store.summary().tags == 1
        assert store.delete_tag("r", "n", "t") and store.get_tag("r", "n", "t", TagKind.SINGLE) is None

    def test_a_tag_of_a_store_from_before_kinds_reads_as_what_it_names(self, tmp_path):
        with diskcache.Cache(str(tmp_path / "cache" / "content")) as old:
            old.set(("tag", "docker.io", "library/alpine", "3"), (MANIFEST_DIGEST, 1000.0))
        store = Store(tmp_path / "cache")
        try:
            assert store.get_tag("docker.io", "library/alpine", "3") == TagEntry(MANIFEST_DIGEST, 1000.0)
            assert store.get_tag("docker.io", "library/alpine", "3", TagKind.SINGLE) is None
        finally:
            store.close()


class TestBlobs:
    def test_verified_commit(self, store):
        writer = fill(store, BLOB_DIGEST, [BLOB[:1000], BLOB[1000:]])
        assert writer.size == len(BLOB)
        assert writer.computed_digest == BLOB_DIGEST
        assert writer.verified() and writer.verified(len(BLOB))
        assert not store.has_blob(BLOB_DIGEST)  # nothing visible before the commit
        writer.commit()
        assert store.has_blob(BLOB_DIGEST)
        assert store.blob_size(BLOB_DIGEST) == len(BLOB)
        with store.open_blob(BLOB_DIGEST) as f:
            assert f.read() == BLOB
        assert temp_files(store) == []  # moved into place, not copied

    def test_wrong_bytes_are_refused(self, store):
        writer = fill(store, BLOB_DIGEST, [BLOB[:-1], b"X"])
        assert not writer.verified()
        assert writer.computed_digest == digest_of(BLOB[:-1] + b"X")
        assert temp_files(store)  # the partial file exists until the refusal
        with pytest.raises(ValueError):
            writer.commit()
        assert not store.has_blob(BLOB_DIGEST)
        assert store.open_blob(BLOB_DIGEST) is None
        assert store.blob_size(BLOB_DIGEST) is None
        assert temp_files(store) == []

    def test_truncated_bytes_are_refused(self, store):
        writer = fill(store, BLOB_DIGEST, [BLOB[:100]])
        with pytest.raises(ValueError):
            writer.commit()
        assert not store.has_blob(BLOB_DIGEST)

    def test_size_check(self, store):
        writer = fill(store, BLOB_DIGEST, [BLOB])
        assert writer.verified(len(BLOB))
        assert not writer.verified(len(BLOB) + 1)
        assert not writer.verified(len(BLOB) - 1)
        writer.discard()

    def test_sha512_blob(self, store):
        digest = digest_of(BLOB, "sha512")
        writer = fill(store, digest, [BLOB])
        assert writer.verified()
        writer.commit()
        assert store.blob_size(digest) == len(BLOB)

    def test_empty_blob(self, store):
        digest = digest_of(b"")
        store.blob_writer(digest).commit()
        assert store.blob_size(digest) == 0

    def test_write_error_refuses_commit(self, store, monkeypatch):
        writer = store.blob_writer(BLOB_DIGEST)
        writer.write(BLOB[:1000])

        def no_space(data):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(writer._file, "write", no_space)
        writer.write(BLOB[1000:])
        # The bytes were still hashed: the client can be told they verify, they just aren't kept.
        assert writer.verified(len(BLOB))
        assert writer.write_error is not None and writer.write_error.errno == 28
        with pytest.raises(ValueError):
            writer.commit()
        assert not store.has_blob(BLOB_DIGEST)
        assert temp_files(store) == []

    def test_discard(self, store):
        writer = fill(store, BLOB_DIGEST, [BLOB])
        writer.discard()
        writer.discard()  # twice is harmless
        assert temp_files(store) == []
        assert not store.has_blob(BLOB_DIGEST)

    def test_second_commit_of_the_same_digest_keeps_one_copy(self, store):
        first = fill(store, BLOB_DIGEST, [BLOB])
        second = fill(store, BLOB_DIGEST, [BLOB])
        first.commit()
        second.commit()
        assert temp_files(store) == []
        with store.open_blob(BLOB_DIGEST) as f:
            assert f.read() == BLOB

    def test_blob_survives_reopening(self, tmp_path):
        s = Store(tmp_path)
        fill(s, BLOB_DIGEST, [BLOB]).commit()
        s.put_manifest(MANIFEST_DIGEST, OCI_MANIFEST, MANIFEST)
        s.set_tag("r", "n", "t", MANIFEST_DIGEST)
        s.close()
        s = Store(tmp_path)
        try:
            with s.open_blob(BLOB_DIGEST) as f:
                assert f.read() == BLOB
            assert s.get_manifest(MANIFEST_DIGEST).body == MANIFEST
            assert s.get_tag("r", "n", "t").digest == MANIFEST_DIGEST
        finally:
            s.close()

    def test_open_blob_whose_file_vanished_is_a_miss(self, store):
        fill(store, BLOB_DIGEST, [BLOB]).commit()
        with store.open_blob(BLOB_DIGEST) as f:
            path = f.name
        os.unlink(path)
        assert store.open_blob(BLOB_DIGEST) is None
        assert not store.has_blob(BLOB_DIGEST)
        assert store.summary().blobs == 0, "the counts forget it too"

    def test_a_commit_between_two_looks_is_kept(self, store, monkeypatch):
        """Another process commits the blob just after open_blob's first look found nothing."""
        real = store._read_blob
        looks = []

        def first_look_misses(digest):
            looks.append(digest)
            if len(looks) == 1:
                fill(store, BLOB_DIGEST, [BLOB]).commit()
                return None
            return real(digest)

        monkeypatch.setattr(store, "_read_blob", first_look_misses)
        with store.open_blob(BLOB_DIGEST) as f:
            assert f.read() == BLOB
        assert store.has_blob(BLOB_DIGEST), "the fresh blob was not taken for a vanished one"


class TestTemporaryFiles:
    def test_leftovers_under_a_reused_pid_are_removed(self, tmp_path):
        # A restarted container may give the new process the pid of the one that died mid-fill.
        leftover = tmp_path / "tmp" / str(os.getpid()) / "oldstore" / "fill-junk"
        leftover.parent.mkdir(parents=True)
        leftover.write_bytes(b"partial")
        live = Store(tmp_path)
        again = Store(tmp_path)  # a second store in this process keeps the first one's folder
        try:
            assert not leftover.parent.exists()
            writer = fill(live, BLOB_DIGEST, [BLOB])
            writer.commit()
            assert live.blob_size(BLOB_DIGEST) == len(BLOB)
        finally:
            again.close()
            live.close()

    def test_close_removes_own_temp_files(self, tmp_path):
        s = Store(tmp_path)
        fill(s, BLOB_DIGEST, [BLOB])  # an unfinished fill
        s.close()
        assert temp_files(s) == []

    def test_two_stores_on_one_folder_in_one_process(self, tmp_path):
        # Reconfiguring the addon opens the new store before closing the old one.
        first = Store(tmp_path)
        second = Store(tmp_path)
        first.close()
        try:
            writer = fill(second, BLOB_DIGEST, [BLOB])
            writer.commit()
            assert second.blob_size(BLOB_DIGEST) == len(BLOB)
        finally:
            second.close()


class TestAnIndexThatCannotBeWritten:
    """A full disk or a read-only folder makes SQLite fail: that is an OSError, and a read is a miss."""

    @pytest.fixture
    def broken(self, store, monkeypatch):
        def refuse(*args, **kwargs):
            raise sqlite3.OperationalError("attempt to write a readonly database")

        monkeypatch.setattr(diskcache.Cache, "set", refuse)
        monkeypatch.setattr(diskcache.Cache, "get", refuse)
        return store

    def test_writes_raise_os_errors(self, broken):
        with pytest.raises(OSError, match="readonly database"):
            broken.set_tag("r", "n", "t", MANIFEST_DIGEST)
        with pytest.raises(OSError):
            broken.put_manifest(MANIFEST_DIGEST, OCI_MANIFEST, MANIFEST)

    def test_reads_are_misses(self, broken):
        assert broken.get_manifest(MANIFEST_DIGEST) is None
        assert broken.get_tag("r", "n", "t") is None
        assert broken.visibility("r", "n") is None
        assert broken.open_blob(BLOB_DIGEST) is None


def test_the_summary_counts_what_the_store_holds(store):
    fill(store, BLOB_DIGEST, [BLOB]).commit()
    store.put_manifest(MANIFEST_DIGEST, OCI_MANIFEST, MANIFEST)
    for name, tag in [("library/alpine", "3"), ("library/alpine", "latest"), ("org/app", "1")]:
        store.set_tag("docker.io", name, tag, MANIFEST_DIGEST)
    summary = store.summary()
    assert (summary.blobs, summary.blob_bytes, summary.manifests, summary.tags, summary.repositories) == (
        1, len(BLOB), 1, 3, 2)


def test_every_connection_maps_none_of_the_database_and_caches_a_few_pages(tmp_path):
    """docs/architecture.md (store scale): SQLite's memory per connection is bounded, in every
    thread's connection, also in a store diskcache created with its defaults (a 64 MB map)."""
    diskcache.Cache(str(tmp_path / "cache" / "content")).close()
    store = Store(tmp_path / "cache")
    seen: list[tuple[int, int]] = []

    def pragmas() -> None:
        sql = store._cache._sql
        seen.append((sql("PRAGMA mmap_size").fetchone()[0], sql("PRAGMA cache_size").fetchone()[0]))

    threads = [threading.Thread(target=pragmas) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    pragmas()
    store.close()
    assert seen == [(0, 1024)] * 4


@pytest.mark.parametrize(
    "blob, inline_max, expected",
    [
        (BLOB, len(BLOB), "body"),  # at the limit: its bytes, hashed again
        (BLOB, len(BLOB) - 1, "size"),  # above it: its size only
        (b"", 0, "body"),  # an empty layer is answered too
        (b"", -1, "size"),  # -1: none in memory, whatever its size (a Range)
    ],
)
def test_a_blob_to_answer_is_its_size_and_if_small_its_verified_bytes(store, blob, inline_max, expected):
    digest = digest_of(blob)
    assert store.blob_to_answer(digest, inline_max) is None, "not held"
    fill(store, digest, [blob]).commit()
    assert store.blob_to_answer(digest, inline_max) == (len(blob), blob if expected == "body" else None)
