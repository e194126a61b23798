"""A fill: the body of hubcache's own upstream request, written and hashed off the event loop."""

import os

import pytest

from hubcache.cache.fills import Fill, State
from hubcache.registry.protocol import Kind, Route, digest_of
from hubcache.storage.store import Store

BLOB = os.urandom(300_000)
DIGEST = digest_of(BLOB)
CHUNKS = [BLOB[i : i + 65536] for i in range(0, len(BLOB), 65536)]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    yield s
    s.close()


def temp_files(store: Store) -> list[str]:
    root = store.directory / "tmp"
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def new_fill(store: Store, digest: str = DIGEST) -> Fill:
    fill = Fill(Route(Kind.BLOB, "docker.io", "library/alpine", digest))
    fill.writer = store.blob_writer(digest)
    return fill


def fill_with(store: Store, chunks: list[bytes], size: int | None = len(BLOB), digest: str = DIGEST) -> Fill:
    fill = new_fill(store, digest)
    fill.start_streaming(size)
    for chunk in chunks:
        assert fill.sink(chunk) == [], "nobody reads hubcache's own request"
    fill.sink(b"")
    return fill


async def test_streaming_is_announced(store):
    fill = new_fill(store)
    assert not fill.answered.is_set()
    fill.start_streaming(len(BLOB))
    assert fill.answered.is_set() and fill.state is State.STREAMING and fill.size == len(BLOB)
    assert (store.directory / "tmp" / fill.name).is_file(), "the blob server finds the file by its name"
    fill.sink(b"")
    fill.discard()


def test_a_verified_body_is_committed(store):
    fill = fill_with(store, CHUNKS)
    assert fill.finish() and fill.state is State.COMMITTED
    with store.open_blob(DIGEST) as f:
        assert f.read() == BLOB
    fill.discard()  # after a commit: nothing to drop
    assert store.has_blob(DIGEST) and temp_files(store) == []


def test_unknown_size_verifies_by_digest(store):
    assert fill_with(store, CHUNKS, size=None).finish()


@pytest.mark.parametrize(
    "chunks, size",
    [
        (CHUNKS[:-1] + [CHUNKS[-1][:-1] + b"\x00"], len(BLOB)),  # wrong bytes
        (CHUNKS, len(BLOB) + 1),  # wrong size
        (CHUNKS[:2], len(BLOB)),  # short
    ],
)
def test_a_body_that_does_not_verify_is_never_stored(store, chunks, size, monkeypatch):
    fill = fill_with(store, chunks, size)
    # The store refuses such bytes too (test_store.py): the fill must not even ask it to commit them.
    monkeypatch.setattr(fill.writer, "commit", lambda: pytest.fail("the fill asked the store to commit bytes that did not verify"))
    assert not fill.finish() and fill.state is State.REJECTED
    fill.discard()
    assert not store.has_blob(DIGEST) and temp_files(store) == []


def test_discard_mid_body_stops_the_writer(store):
    fill = new_fill(store)
    fill.start_streaming(len(BLOB))
    fill.sink(CHUNKS[0])
    fill.discard()
    assert not fill._thread.is_alive() and temp_files(store) == []


def test_a_write_error_is_kept_not_raised(store, monkeypatch):
    fill = new_fill(store)

    def no_space(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fill.writer._file, "write", no_space)
    fill.start_streaming(len(BLOB))
    for chunk in CHUNKS:
        fill.sink(chunk)
    fill.sink(b"")
    assert not fill.finish()
    assert fill.writer.write_error.errno == 28
    fill.discard()
    assert not store.has_blob(DIGEST)


def test_failure_is_announced(store):
    fill = new_fill(store)
    fill.fail("upstream sent nothing for 60s")
    assert fill.answered.is_set() and fill.state is State.FAILED and fill.reason == "upstream sent nothing for 60s"
    fill.discard()
    assert temp_files(store) == []
