"""The shared tier of fleet mode against a real S3 store (OpenStack Swift with s3api) and a real
Redis, both on loopback. The refusals that need neither are in tests/unit/test_shared.py."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from pathlib import Path

import pytest
import s3transfer.utils

from hubcache.fleet.s3 import FleetLock, MiB, NotInSharedStore, SharedStore, SharedStoreError, SharedTag
from hubcache.registry.protocol import digest_of

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def blob_file(folder: Path, size: int, seed: int = 0) -> tuple[str, Path]:
    """An incompressible file of `size` bytes and its digest."""
    path = folder / f"blob-{seed}-{size}"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        block = hashlib.sha256(f"{seed}".encode()).digest() * 32768  # 1 MiB, then varied per block
        written = 0
        while written < size:
            chunk = hashlib.sha256(block + written.to_bytes(8, "big")).digest() + block
            chunk = chunk[: min(len(chunk), size - written)]
            f.write(chunk)
            h.update(chunk)
            written += len(chunk)
    return f"sha256:{h.hexdigest()}", path


def hash_stream(chunks) -> tuple[str, int, int]:
    """Digest, byte count and largest chunk of what a SharedBlob yields."""
    h = hashlib.sha256()
    total = largest = 0
    for chunk in chunks:
        h.update(chunk)
        total += len(chunk)
        largest = max(largest, len(chunk))
    return f"sha256:{h.hexdigest()}", total, largest


@pytest.fixture
def bucket(swift) -> str:
    swift.start()  # a test before may have stopped it
    return swift.make_bucket(f"t-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def shared(swift, bucket):
    """A factory of SharedStores on a fresh bucket; small parts so multipart shows in tests."""

    def make(prefix: str = "fleet", **kwargs) -> SharedStore:
        options = {"timeout": 5.0, "multipart_threshold": 8 * MiB, "part_size": 5 * MiB, **kwargs}
        return SharedStore(
            f"s3://{bucket}/{prefix}", swift.endpoint, None, swift.access_key, swift.secret_key, True, **options
        )

    return make


def test_check_passes_on_a_reachable_bucket(shared):
    shared().check()


def test_check_names_a_missing_bucket(swift):
    swift.start()
    store = SharedStore("s3://no-such-bucket", swift.endpoint, None, swift.access_key, swift.secret_key, True, 5.0)
    with pytest.raises(SharedStoreError) as e:
        store.check()
    assert str(e.value) == f"shared store {swift.endpoint}: bucket 'no-such-bucket' does not exist"


def test_check_refuses_wrong_credentials(swift, bucket):
    store = SharedStore(f"s3://{bucket}", swift.endpoint, None, swift.access_key, "wrong", True, 5.0)
    with pytest.raises(SharedStoreError) as e:
        store.check()
    assert str(e.value) == f"shared store {swift.endpoint}: access denied"


def test_check_names_a_store_that_is_down(swift, shared):
    store = shared()
    swift.stop()
    try:
        with pytest.raises(SharedStoreError) as e:
            store.check()
        assert str(e.value) == f"shared store {swift.endpoint}: cannot connect (Connection refused)"
        with pytest.raises(SharedStoreError) as e:
            store.blob_size(digest_of(b"x"))
        assert str(e.value) == (
            f"shared store {swift.endpoint}: head blob {digest_of(b'x')}: cannot connect (Connection refused)"
        )
    finally:
        swift.start()
    store.check()  # the same store works again once the server is back


def test_check_names_a_store_that_does_not_answer(swift, shared):
    store = shared(timeout=1.0)
    swift.pause()
    try:
        with pytest.raises(SharedStoreError) as e:
            store.check()
    finally:
        swift.resume()
    assert str(e.value) == f"shared store {swift.endpoint}: no answer (timed out after 1 s)"


def test_blob_round_trip_small(shared, tmp_path):
    store = shared()
    digest, path = blob_file(tmp_path, 1000)
    assert store.blob_size(digest) is None
    assert store.put_blob(digest, path) is True
    assert store.blob_size(digest) == 1000
    with store.open_blob(digest) as blob:
        assert blob.size == 1000 and blob.start == 0
        assert blob.read() == path.read_bytes()


def test_blob_is_stored_under_its_digest(swift, bucket, shared, tmp_path):
    digest, path = blob_file(tmp_path, 10)
    shared(prefix="a/b").put_blob(digest, path)
    key = f"a/b/blobs/sha256/{digest.partition(':')[2]}"
    assert swift.client().head_object(Bucket=bucket, Key=key)["ContentLength"] == 10


def test_empty_blob(shared, tmp_path):
    store = shared()
    digest, path = blob_file(tmp_path, 0)
    store.put_blob(digest, path)
    assert store.blob_size(digest) == 0
    with store.open_blob(digest) as blob:
        assert hash_stream(blob) == (digest, 0, 0)


def test_large_blob_goes_in_parts_and_streams_back(swift, bucket, shared, tmp_path, record_property):
    store = shared()
    digest, path = blob_file(tmp_path, 40 * 1000 * 1000)
    began = time.monotonic()
    assert store.put_blob(digest, path)
    put_seconds = time.monotonic() - began
    key = f"fleet/blobs/sha256/{digest.partition(':')[2]}"
    etag = swift.client().head_object(Bucket=bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-8")  # a multipart upload's ETag counts its parts: 40 MB / 5 MiB
    began = time.monotonic()
    with store.open_blob(digest) as blob:
        assert hash_stream(blob) == (digest, 40 * 1000 * 1000, MiB)  # never more than a chunk at once
    get_seconds = time.monotonic() - began
    record_property("put_MBps", round(40 / put_seconds, 1))
    record_property("get_MBps", round(40 / get_seconds, 1))
    print(f"40 MB blob: put {40 / put_seconds:.1f} MB/s, get {40 / get_seconds:.1f} MB/s")


def test_ranged_reads(shared, tmp_path):
    store = shared()
    digest, path = blob_file(tmp_path, 3 * MiB + 17)
    data = path.read_bytes()
    store.put_blob(digest, path)
    for start in (1, MiB, len(data) - 1):
        with store.open_blob(digest, start) as blob:
            assert (blob.start, blob.size) == (start, len(data))
            assert b"".join(blob) == data[start:]
    with pytest.raises(NotInSharedStore):
        store.open_blob(digest, len(data))


def test_missing_objects(shared):
    store = shared()
    digest = digest_of(b"nothing")
    assert store.blob_size(digest) is None
    with pytest.raises(NotInSharedStore) as e:
        store.open_blob(digest)
    assert str(e.value).endswith(f"get blob {digest}: not there")
    assert store.get_manifest(digest) is None
    assert store.get_tag("docker.io", "library/alpine", "3.20") is None
    assert store.get_recording("lab") is None
    assert store.recordings() == []


def test_second_put_sends_nothing(swift, bucket, shared, tmp_path):
    store = shared()
    digest, path = blob_file(tmp_path, 12 * MiB)
    assert store.put_blob(digest, path) is True
    key = f"fleet/blobs/sha256/{digest.partition(':')[2]}"
    first = swift.client().head_object(Bucket=bucket, Key=key)["LastModified"]
    time.sleep(1.1)  # Last-Modified has one-second resolution
    assert store.put_blob(digest, path) is False
    assert swift.client().head_object(Bucket=bucket, Key=key)["LastModified"] == first


def test_a_wrong_sized_object_is_replaced(swift, bucket, shared, tmp_path):
    store = shared()
    digest, path = blob_file(tmp_path, 2000)
    key = f"fleet/blobs/sha256/{digest.partition(':')[2]}"
    swift.client().put_object(Bucket=bucket, Key=key, Body=b"truncated")
    assert store.put_blob(digest, path) is True
    with store.open_blob(digest) as blob:
        assert hash_stream(blob)[0] == digest


def test_readers_see_nothing_or_the_whole_blob_during_an_upload(shared, tmp_path):
    writer, reader = shared(), shared()
    digest, path = blob_file(tmp_path, 30 * MiB, seed=7)
    seen: set[int | None] = set()
    uploader = threading.Thread(target=writer.put_blob, args=(digest, path))
    uploader.start()
    while uploader.is_alive():
        seen.add(reader.blob_size(digest))
    uploader.join()
    seen.add(reader.blob_size(digest))
    assert None in seen and seen <= {None, 30 * MiB}, seen
    with reader.open_blob(digest) as blob:
        assert hash_stream(blob)[0] == digest


def test_store_killed_mid_upload_leaves_no_object(swift, bucket, shared, tmp_path):
    store = shared()
    digest, path = blob_file(tmp_path, 40 * 1000 * 1000, seed=3)
    errors: list[BaseException] = []

    def put() -> None:
        try:
            store.put_blob(digest, path)
        except BaseException as e:
            errors.append(e)

    uploader = threading.Thread(target=put)
    uploader.start()
    # Kill the store once the upload is under way: its multipart upload was started.
    watcher = swift.client()
    deadline = time.monotonic() + 60
    while not watcher.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.02)
    swift.kill()
    uploader.join(60)
    swift.start()
    assert not uploader.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], SharedStoreError), errors
    assert str(errors[0]).startswith(f"shared store {swift.endpoint}: put blob {digest}: ")
    assert "\n" not in str(errors[0])
    assert store.blob_size(digest) is None
    with pytest.raises(NotInSharedStore):
        store.open_blob(digest)
    # The next node's put completes it.
    assert store.put_blob(digest, path) is True
    with store.open_blob(digest) as blob:
        assert hash_stream(blob)[0] == digest


def test_store_killed_mid_read_fails_in_one_line(swift, shared, tmp_path):
    store = shared()
    digest, path = blob_file(tmp_path, 40 * 1000 * 1000, seed=6)
    store.put_blob(digest, path)
    received = 0
    try:
        with pytest.raises(SharedStoreError) as e, store.open_blob(digest) as blob:
            for chunk in blob:
                if not received:
                    swift.kill()
                received += len(chunk)
    finally:
        swift.start()
    assert 0 < received < 40 * 1000 * 1000
    assert str(e.value) == (
        f"shared store {swift.endpoint}: get blob {digest}: connection closed after {received} of 40000000 bytes"
    )


def test_failing_source_file_leaves_no_object(swift, bucket, shared, tmp_path, monkeypatch):
    """The local file fails midway (an I/O error on the cache disk): no object, no parts left."""
    store = shared()
    digest, path = blob_file(tmp_path, 20 * MiB, seed=4)
    real_read = s3transfer.utils.ReadFileChunk.read

    def failing_read(chunk, amount=None):
        if chunk._start_byte >= 10 * MiB:  # the third 5 MiB part
            raise OSError(5, "Input/output error")
        return real_read(chunk, amount)

    monkeypatch.setattr(s3transfer.utils.ReadFileChunk, "read", failing_read)
    with pytest.raises(SharedStoreError) as e:
        store.put_blob(digest, path)
    monkeypatch.undo()
    assert str(e.value) == f"shared store {swift.endpoint}: put blob {digest}: failed (Input/output error)"
    assert store.blob_size(digest) is None
    assert not swift.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_two_nodes_putting_one_digest_at_once(shared, tmp_path):
    digest, path = blob_file(tmp_path, 20 * MiB, seed=5)
    nodes = [shared(), shared()]
    barrier = threading.Barrier(2)
    results: list[object] = []

    def put(store: SharedStore) -> None:
        barrier.wait()
        try:
            results.append(store.put_blob(digest, path))
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=put, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r in (True, False) for r in results) and True in results, results
    with nodes[0].open_blob(digest) as blob:
        assert hash_stream(blob)[:2] == (digest, 20 * MiB)


def test_manifest_round_trip_with_media_type(shared):
    store = shared()
    body = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE}).encode()
    digest = digest_of(body)
    store.put_manifest(digest, MANIFEST_TYPE, body)
    manifest = store.get_manifest(digest)
    assert manifest is not None
    assert (manifest.digest, manifest.media_type, manifest.body) == (digest, MANIFEST_TYPE, body)


def test_manifest_with_wrong_bytes_is_refused(swift, bucket, shared, caplog):
    store = shared()
    body = b'{"schemaVersion": 2}'
    digest = digest_of(body)
    store.put_manifest(digest, MANIFEST_TYPE, body)
    key = f"fleet/manifests/sha256/{digest.partition(':')[2]}"
    swift.client().put_object(Bucket=bucket, Key=key, Body=b'{"schemaVersion": 3}', ContentType=MANIFEST_TYPE)
    with caplog.at_level(logging.WARNING, logger="hubcache.fleet.s3"):
        assert store.get_manifest(digest) is None
    assert f"manifest {digest} read back does not match its digest" in caplog.text


def test_tags(swift, bucket, shared):
    store = shared()
    digest = digest_of(b"m")
    store.put_tag("docker.io", "library/alpine", "3.20", digest, MANIFEST_TYPE, confirmed=1700000000.5)
    assert store.get_tag("docker.io", "library/alpine", "3.20") == SharedTag(digest, MANIFEST_TYPE, 1700000000.5)
    raw = swift.client().get_object(Bucket=bucket, Key="fleet/tags/docker.io/library/alpine/3.20")
    assert json.loads(raw["Body"].read()) == {"digest": digest, "media_type": MANIFEST_TYPE, "confirmed": 1700000000.5}
    assert store.get_tag("docker.io", "library/alpine", "3.19") is None
    with pytest.raises(ValueError):
        store.get_tag("docker.io", "library/../../x", "1")


def test_a_tag_confirmed_in_the_future_counts_as_never_confirmed(shared):
    """A record's time is validated: one from the future would spare the tag revalidation for ever."""
    store = shared()
    digest = digest_of(b"m")
    store.put_tag("docker.io", "library/alpine", "future", digest, MANIFEST_TYPE, confirmed=time.time() + 10**9)
    assert store.get_tag("docker.io", "library/alpine", "future").confirmed == 0
    store.put_tag("docker.io", "library/alpine", "negative", digest, MANIFEST_TYPE, confirmed=-5)
    assert store.get_tag("docker.io", "library/alpine", "negative").confirmed == 0


def test_unreadable_tag_record_is_ignored(swift, bucket, shared):
    swift.client().put_object(Bucket=bucket, Key="fleet/tags/docker.io/library/alpine/1", Body=b"{not json")
    assert shared().get_tag("docker.io", "library/alpine", "1") is None


def test_recordings(shared):
    store = shared()
    store.put_recording("lab", "name: lab\nimages: {}\n")
    store.put_recording("ci.2", "name: ci.2\n")
    assert store.get_recording("lab") == "name: lab\nimages: {}\n"
    assert store.recordings() == ["ci.2", "lab"]


def test_prefixes_keep_fleets_apart(shared, tmp_path):
    one, other = shared(prefix="one"), shared(prefix="other")
    digest, path = blob_file(tmp_path, 5)
    one.put_blob(digest, path)
    one.put_recording("lab", "x")
    assert other.blob_size(digest) is None
    assert other.recordings() == []


# --- FleetLock over a real Redis ------------------------------------------------------------


@pytest.fixture
def lock_url(redis) -> str:
    redis.start()
    return redis.url


def test_only_one_of_two_nodes_takes_the_lock(lock_url):
    digest = digest_of(uuid.uuid4().bytes)
    a, b = FleetLock(lock_url), FleetLock(lock_url)
    barrier = threading.Barrier(2)
    won: dict[str, bool] = {}

    def take(name: str, lock: FleetLock) -> None:
        barrier.wait()
        won[name] = lock.acquire(digest, 30)

    threads = [threading.Thread(target=take, args=item) for item in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(won.values()) == [False, True]
    winner, loser = (a, b) if won["a"] else (b, a)
    loser.release(digest)  # not its lock: nothing happens
    assert loser.acquire(digest, 30) is False
    winner.release(digest)
    assert loser.acquire(digest, 30) is True


def test_release_by_a_non_owner_leaves_the_lock(redis, lock_url):
    digest = digest_of(uuid.uuid4().bytes)
    owner, other = FleetLock(lock_url), FleetLock(lock_url)
    assert owner.acquire(digest, 30)
    other.release(digest)
    assert other.refresh(digest, 30) is False
    assert redis.client().exists(f"hubcache:lock:{digest}") == 1
    owner.release(digest)
    assert redis.client().exists(f"hubcache:lock:{digest}") == 0


def test_lock_expires_after_its_ttl_and_refresh_keeps_it(redis, lock_url):
    digest = digest_of(uuid.uuid4().bytes)
    key = f"hubcache:lock:{digest}"
    a, b = FleetLock(lock_url), FleetLock(lock_url)
    assert a.acquire(digest, 30)
    assert a.refresh(digest, 300) is True
    assert redis.client().pttl(key) > 30_000, "a refresh gives the lock its time to live anew"
    assert b.acquire(digest, 30) is False  # still a's
    a.release(digest)
    assert b.acquire(digest, 0.3) is True
    deadline = time.monotonic() + 30
    while redis.client().exists(key):
        assert time.monotonic() < deadline, "the lock outlived its time to live"
        time.sleep(0.05)
    assert b.refresh(digest, 30) is False  # expired: no longer b's
    assert a.acquire(digest, 30) is True
    # b's late release must not free a's lock.
    b.release(digest)
    assert b.acquire(digest, 30) is False


def test_lock_namespaces_keep_fleets_apart(lock_url):
    digest = digest_of(uuid.uuid4().bytes)
    assert FleetLock(lock_url, namespace="one").acquire(digest, 30)
    assert FleetLock(lock_url, namespace="two").acquire(digest, 30)


def test_redis_down_means_no_lock(redis, lock_url, caplog):
    digest = digest_of(uuid.uuid4().bytes)
    lock = FleetLock(lock_url, timeout=1.0)
    redis.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="hubcache.fleet.s3"):
            with pytest.raises(SharedStoreError) as e:
                lock.check()
            assert lock.acquire(digest, 30) is True
            assert lock.refresh(digest, 30) is True  # no lock to lose
            assert lock.acquire(digest, 30) is True
            lock.release(digest)
    finally:
        redis.start()
    assert str(e.value) == f"fleet lock {lock_url}: cannot connect (Connection refused)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"fleet lock {lock_url}: cannot connect (Connection refused); working without the lock"]
    # Back up: the lock works again.
    assert lock.acquire(digest, 30) is True
    assert FleetLock(lock_url).acquire(digest, 30) is False
