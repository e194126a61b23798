"""Fleet mode's options and a node without a shared store (taddons); the shared tier itself, with
real Swift and Redis, is in tests/integration/test_fleet.py and
tests/integration/test_shared.py."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from hubcache.fleet.node import Fleet


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fleet_lock": "redis://127.0.0.1:1/0"}, "fleet_lock needs shared_store: the lock guards fills of the shared store"),
        ({"shared_store": "http://bucket/x"}, "shared store 'http://bucket/x': not an s3://bucket[/prefix] URL"),
        ({"shared_store": "s3://b", "fleet_lock": "http://127.0.0.1:1"}, "fleet_lock: 'http://127.0.0.1:1' is not a redis://HOST:PORT/DB URL"),
        ({"shared_store": "s3://b", "shared_store_credentials": "key:secret"}, "shared_store_credentials: credentials must be @FILE or env:NAME (holding ACCESS_KEY:SECRET_KEY), not given inline"),
        ({"shared_store": "s3://b", "shared_store_credentials": "env:HUBCACHE_UNSET_S3"}, "shared_store_credentials: the environment variable HUBCACHE_UNSET_S3 is not set"),
        ({"shared_store": "s3://b", "shared_store_credentials": "@/nonexistent/s3"}, "shared_store_credentials: cannot read credentials from /nonexistent/s3: No such file or directory"),
        ({"shared_store_retry": 0}, "shared_store_retry must be 1 or more seconds"),
    ],
)
def test_a_bad_option_is_one_line(options, message):
    fleet = Fleet()
    with taddons.context(fleet) as tctx, pytest.raises(exceptions.OptionsError) as e:
        tctx.configure(fleet, **options)
    assert str(e.value) == message


def test_credentials_must_name_both_keys(tmp_path):
    secret = tmp_path / "s3"
    secret.write_text("justonekey\n")
    fleet = Fleet()
    with taddons.context(fleet) as tctx, pytest.raises(exceptions.OptionsError, match="must be ACCESS_KEY:SECRET_KEY"):
        tctx.configure(fleet, shared_store="s3://b", shared_store_credentials=f"@{secret}")


async def test_without_a_shared_store_the_fleet_is_a_fleet_of_one():
    fleet = Fleet()
    with taddons.context(fleet) as tctx:
        tctx.configure(fleet, shared_store="")
        assert not fleet.enabled
        digest = "sha256:" + "0" * 64
        assert await fleet.open_blob(digest) is None
        assert await fleet.get_manifest(digest) is None
        assert await fleet.claim(digest) is True  # no lock: this node fetches it itself
        fleet.publish_manifest(digest, "x", b"", None)  # nothing to put it to
