"""A fill: the body of hubcache's own upstream request, written and hashed off the event loop: on
the caller's thread (the fetcher's), or on a writer thread when it comes on the event loop."""

import errno
import os
import shutil
import threading

import pytest

from hubcache.cache import fills
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


def reused_buffer_chunks() -> tuple[bytearray, list[memoryview]]:
    """BLOB's chunks as the fetcher hands them over: views of one buffer it reads into again."""
    buffer = bytearray(65536)
    return buffer, [memoryview(buffer)[: len(chunk)] for chunk in CHUNKS]


def test_bytes_handed_over_in_one_reused_buffer_are_taken_before_sink_returns(store):
    """Off the event loop (the fetch thread) the caller reads into its buffer again at once."""
    buffer, views = reused_buffer_chunks()
    fill = new_fill(store)
    fill.start_streaming(len(BLOB))
    for chunk, view in zip(CHUNKS, views, strict=True):
        buffer[: len(chunk)] = chunk
        fill.sink(view)
        buffer[:] = bytes(len(buffer))  # the next read starts over the same bytes
    fill.sink(b"")
    assert not fill._thread.is_alive(), "written on the caller's thread"
    assert fill.finish() and fill.state is State.COMMITTED
    fill.discard()


async def test_on_the_event_loop_the_writer_thread_takes_them_and_the_loop_may_reuse_its_buffer(store, monkeypatch):
    buffer, views = reused_buffer_chunks()
    fill = new_fill(store)
    # The writer thread waits until every chunk was handed over: what it writes is what it kept.
    handed_over, write = threading.Event(), fill.writer.write
    monkeypatch.setattr(fill.writer, "write", lambda data: (handed_over.wait(10), write(data)))
    fill.start_streaming(len(BLOB))
    for chunk, view in zip(CHUNKS, views, strict=True):
        buffer[: len(chunk)] = chunk
        fill.sink(view)
        buffer[:] = bytes(len(buffer))
    assert fill._thread.is_alive(), "the event loop never writes to the disk itself"
    fill.sink(b"")
    handed_over.set()
    assert fill.finish() and fill.state is State.COMMITTED
    fill.discard()


async def test_discard_mid_body_stops_the_writer(store):
    fill = new_fill(store)
    fill.start_streaming(len(BLOB))
    fill.sink(CHUNKS[0])
    assert fill._thread.is_alive()
    fill.discard()
    assert not fill._thread.is_alive() and temp_files(store) == []


def test_bytes_after_a_discard_go_nowhere(store):
    """A fill cut while its fetch thread still writes: the thread's last bytes are dropped."""
    fill = new_fill(store)
    fill.start_streaming(len(BLOB))
    fill.sink(CHUNKS[0])
    fill.discard()
    try:
        fill.sink(CHUNKS[1])
        fill.sink(b"")
    except (OSError, ValueError) as e:
        pytest.fail(f"a write after the discard reached the writer: {e}")
    assert temp_files(store) == [] and not store.has_blob(DIGEST)


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


@pytest.mark.parametrize("size", [None, len(BLOB)])
def test_a_fill_stops_keeping_bytes_once_the_folder_is_down_to_its_reserve(store, monkeypatch, size):
    """Upstream's Content-Length was checked against the room left before the first byte, but an
    answer without one (a hostile upstream's endless chunked body) announced nothing: the room is
    looked at again as the bytes come, and the keeping stops at the reserve."""
    monkeypatch.setattr(fills, "ROOM_CHECK", 100_000)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=fills.FREE_SPACE_RESERVE - 1))
    fill = fill_with(store, CHUNKS, size=size)
    assert not fill.finish()
    assert fill.writer.write_error.errno == errno.ENOSPC and "down to" in fill.writer.write_error.strerror
    assert os.path.getsize(fill.writer.path) < 100_000 + 65536, "nothing kept after the check"
    fill.discard()
    assert not store.has_blob(DIGEST) and temp_files(store) == []


def test_a_fill_with_room_left_is_kept_whole(store, monkeypatch):
    monkeypatch.setattr(fills, "ROOM_CHECK", 100_000)
    checked = []
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: checked.append(path) or real(path)._replace(free=fills.FREE_SPACE_RESERVE))
    fill = fill_with(store, CHUNKS, size=None)
    assert fill.finish() and store.has_blob(DIGEST)
    assert len(checked) == len(BLOB) // 100_000, "looked at once per ROOM_CHECK bytes"
    fill.discard()


def test_failure_is_announced(store):
    fill = new_fill(store)
    fill.fail("upstream sent nothing for 60s")
    assert fill.answered.is_set() and fill.state is State.FAILED and fill.reason == "upstream sent nothing for 60s"
    fill.discard()
    assert temp_files(store) == []
