"""Where the blob server listens for clients on other machines (addon/blobserver/host.py)."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from hubcache.blobserver.host import INLINE_CAP, BlobHost, direct_listen, parse_blob_listen
from hubcache.mitm import internals


@pytest.mark.parametrize(
    "blob_listen, listen_host, expected",
    [
        ("", "10.0.0.5", ("10.0.0.5", 0)),  # the proxy's one address beyond loopback
        ("", "127.0.0.1", None),  # this machine's clients only: loopback URLs
        ("", "0.0.0.0", None),  # every address: none to name, relayed
        ("", "", None),
        ("", "::", None),
        ("10.0.0.5:5001", "0.0.0.0", ("10.0.0.5", 5001)),
        ("cache.example.internal", "0.0.0.0", ("cache.example.internal", 0)),
        ("[fd00::5]:5001", "0.0.0.0", ("fd00::5", 5001)),
        ("relay", "10.0.0.5", None),
    ],
)
def test_direct_listen(blob_listen, listen_host, expected):
    assert direct_listen(blob_listen, listen_host) == expected


@pytest.mark.parametrize("bad", ["10.0.0.5:", "10.0.0.5:99999", "[fd00::5", "a b", "x/y:5", "10.0.0.5:\u00b2", "10.0.0.5:" + "9" * 5000])
def test_a_bad_address_is_refused(bad):
    with pytest.raises(ValueError):
        parse_blob_listen(bad)
    host = BlobHost(internals.certstore)
    with taddons.context(host) as tctx, pytest.raises(exceptions.OptionsError, match="blob_listen"):
        tctx.configure(host, blob_listen=bad)


@pytest.mark.parametrize("limit", [-1, INLINE_CAP + 1])
def test_the_inline_limit_is_bounded(limit):
    """The proxy holds a blob it answers itself in memory: the limit keeps that small."""
    host = BlobHost(internals.certstore)
    with taddons.context(host) as tctx:
        with pytest.raises(exceptions.OptionsError, match=f"blob_inline_max must be 0 to {INLINE_CAP} bytes"):
            tctx.configure(host, blob_inline_max=limit)
        tctx.configure(host, blob_inline_max=INLINE_CAP)
        assert tctx.options.blob_inline_max == INLINE_CAP


def test_urls_name_the_direct_listener_once_it_listens():
    host = BlobHost(internals.certstore)
    with taddons.context(host) as tctx:
        tctx.configure(host, blob_urls="https")
        assert host.url("sha256:" + "a" * 64).startswith("https://blobs.hubcache.invalid/blobs/")
        host.direct = ("fd00::5", 5001)
        assert host.url("sha256:" + "a" * 64).startswith("https://[fd00::5]:5001/blobs/sha256:")
        assert host.is_direct("[FD00::5]", 5001) and not host.is_direct("fd00::5", 5002)
