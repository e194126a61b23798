"""The prefetch registry client's redirect rules (addon/prefetch.py), with a stand-in opener."""

from __future__ import annotations

import email.message
import io
import urllib.error
from pathlib import Path

import certifi
import pytest

from hubcache.prefetch import PrefetchError, RegistryClient


class Redirecting:
    """An opener whose first answer is a redirect to `location`, then a 200."""

    def __init__(self, location: str):
        self.location = location
        self.opened: list[tuple[str, str | None]] = []

    def open(self, request, timeout=None):
        self.opened.append((request.full_url, request.headers.get("Authorization")))
        if len(self.opened) == 1:
            headers = email.message.Message()
            headers["Location"] = self.location
            raise urllib.error.HTTPError(request.full_url, 302, "Found", headers, io.BytesIO(b""))
        return io.BytesIO(b"blob")


def client(opener) -> RegistryClient:
    c = RegistryClient("http://127.0.0.1:1", Path(certifi.where()))  # any CA file: the opener is a stand-in
    c._opener = opener
    return c


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://example.com/x", "data:,hello"])
def test_a_redirect_to_anything_but_http_is_refused(tmp_path, location):
    opener = Redirecting(location)
    with pytest.raises(PrefetchError, match="not an http"):
        client(opener)._follow("https://registry.example/v2/x/blobs/sha256:0", {"Authorization": "Bearer t"})
    assert len(opener.opened) == 1


def test_a_redirect_to_another_host_drops_the_credentials(tmp_path):
    opener = Redirecting("https://cdn.example/blob?sig=1")
    with client(opener)._follow("https://registry.example/v2/x/blobs/sha256:0", {"Authorization": "Bearer t"}) as r:
        assert r.read() == b"blob"
    assert opener.opened == [("https://registry.example/v2/x/blobs/sha256:0", "Bearer t"), ("https://cdn.example/blob?sig=1", None)]

