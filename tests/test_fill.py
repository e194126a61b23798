import os

import pytest

from addon.fill import Tee
from addon.protocol import digest_of
from addon.store import Store

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


def run(tee: Tee, chunks: list[bytes]) -> list[list[bytes]]:
    """Every output of the callable, the final b"" call last."""
    outputs = [list(tee(chunk)) for chunk in chunks]
    outputs.append(list(tee(b"")))
    return outputs


def test_passes_every_byte_in_order_holding_back_the_last_chunk(store):
    tee = Tee(store.blob_writer(DIGEST), len(BLOB))
    outputs = run(tee, CHUNKS)
    assert outputs[0] == []  # the first chunk is held until the second arrives
    for i in range(1, len(CHUNKS)):
        assert outputs[i] == [CHUNKS[i - 1]]
    assert outputs[-1] == [CHUNKS[-1]]  # released only once the whole body verified
    assert b"".join(b for out in outputs for b in out) == BLOB
    assert tee.finished and tee.verified
    tee.writer.commit()
    with store.open_blob(DIGEST) as f:
        assert f.read() == BLOB


def test_unknown_length_verifies_by_digest(store):
    tee = Tee(store.blob_writer(DIGEST), None)
    outputs = run(tee, CHUNKS)
    assert b"".join(b for out in outputs for b in out) == BLOB
    assert tee.verified


def test_digest_mismatch_withholds_the_end(store):
    bad = CHUNKS[:-1] + [CHUNKS[-1][:-1] + b"\x00"]
    tee = Tee(store.blob_writer(DIGEST), None)
    outputs = run(tee, bad)
    assert outputs[-1] == []
    sent = b"".join(b for out in outputs for b in out)
    assert sent == b"".join(bad[:-1])  # everything but the last chunk
    assert tee.finished and not tee.verified
    with pytest.raises(ValueError):
        tee.writer.commit()
    assert not store.has_blob(DIGEST)


def test_size_mismatch_withholds_the_end(store):
    tee = Tee(store.blob_writer(DIGEST), len(BLOB) + 1)
    assert run(tee, CHUNKS)[-1] == []
    assert not tee.verified


def test_single_chunk_body(store):
    small = b"tiny layer"
    tee = Tee(store.blob_writer(digest_of(small)), len(small))
    assert list(tee(small)) == []
    assert list(tee(b"")) == [small]
    assert tee.verified


def test_abandon_removes_the_temp_file(store):
    tee = Tee(store.blob_writer(DIGEST), len(BLOB))
    for chunk in CHUNKS[:2]:
        tee(chunk)
    assert temp_files(store)
    tee.abandon()
    assert tee.finished
    assert temp_files(store) == []
    assert not tee._thread.is_alive()
    assert not store.has_blob(DIGEST)


def test_abandon_after_finish(store):
    tee = Tee(store.blob_writer(DIGEST), len(BLOB))
    run(tee, CHUNKS)
    tee.abandon()
    assert temp_files(store) == []


def test_never_raises(store, monkeypatch):
    tee = Tee(store.blob_writer(DIGEST), len(BLOB))
    tee(CHUNKS[0])

    def broken(expected_size=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(tee.writer, "verified", broken)
    assert list(tee(b"")) == []
    assert tee.finished and not tee.verified


def test_write_error_still_verifies_for_the_client(store, monkeypatch):
    tee = Tee(store.blob_writer(DIGEST), len(BLOB))

    def no_space(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tee.writer._file, "write", no_space)
    outputs = run(tee, CHUNKS)
    assert b"".join(b for out in outputs for b in out) == BLOB
    assert tee.verified
    assert tee.writer.write_error is not None
    with pytest.raises(ValueError):
        tee.writer.commit()
    assert not store.has_blob(DIGEST)
