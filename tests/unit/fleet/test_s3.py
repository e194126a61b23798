"""The shared tier's refusals that need no S3 store or Redis to answer: a URL that is not S3, bytes
that do not match their digest, a lock nobody serves. The rest, against real Swift and Redis, is in
tests/integration/test_shared.py."""

from __future__ import annotations

import pytest

from hubcache.fleet.s3 import FleetLock, SharedStore, SharedStoreError
from hubcache.registry.protocol import digest_of
from support.procs import free_port

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def test_a_url_that_is_not_s3_is_refused_in_one_line():
    with pytest.raises(SharedStoreError) as e:
        SharedStore("http://bucket/x", "http://127.0.0.1:1", None, "a", "b", True, 1.0)
    assert str(e.value) == "shared store 'http://bucket/x': not an s3://bucket[/prefix] URL"


def test_put_manifest_refuses_bytes_that_do_not_match():
    store = SharedStore("s3://bucket", "http://127.0.0.1:1", None, "a", "b", True, 1.0)
    with pytest.raises(ValueError):
        store.put_manifest(digest_of(b"a"), MANIFEST_TYPE, b"b")


def test_lock_on_a_port_nobody_listens_on():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(SharedStoreError) as e:
        FleetLock(url, timeout=1.0).check()
    assert str(e.value) == f"fleet lock {url}: cannot connect (Connection refused)"


def test_lock_url_password_is_not_shown():
    lock = FleetLock("redis://:s3cret@127.0.0.1:1/0", timeout=0.5)
    assert "s3cret" not in lock.name
    with pytest.raises(SharedStoreError) as e:
        lock.check()
    assert "s3cret" not in str(e.value)
