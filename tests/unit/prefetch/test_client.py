"""The prefetch registry client's redirect rules (addon/prefetch.py), with a stand-in opener."""

from __future__ import annotations

import email.message
import io
import urllib.error
from pathlib import Path

import certifi
import pytest

from hubcache.prefetch.client import PrefetchError, RegistryClient


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


@pytest.mark.parametrize(
    "location",
    ["http://registry.example/v2/x/blobs/sha256:0", "https://registry.example:8443/blob", "//registry.example:80/blob"],
)
def test_a_redirect_to_another_scheme_or_port_of_the_same_host_drops_the_credentials(tmp_path, location):
    opener = Redirecting(location)
    with client(opener)._follow("https://registry.example/v2/x/blobs/sha256:0", {"Authorization": "Bearer t"}) as r:
        assert r.read() == b"blob"
    assert [authorization for _, authorization in opener.opened] == ["Bearer t", None]


@pytest.mark.parametrize("location", ["/v2/y/blobs/sha256:0", "https://REGISTRY.example:443/v2/y/blobs/sha256:0"])
def test_a_redirect_within_the_origin_keeps_the_credentials(tmp_path, location):
    opener = Redirecting(location)
    with client(opener)._follow("https://registry.example/v2/x/blobs/sha256:0", {"Authorization": "Bearer t"}) as r:
        assert r.read() == b"blob"
    assert [authorization for _, authorization in opener.opened] == ["Bearer t", "Bearer t"]



# logins: where they come from, and where they are presented

import base64  # noqa: E402
import json  # noqa: E402

from hubcache.prefetch import logins  # noqa: E402
from hubcache.registry.protocol import ImageReference  # noqa: E402

GHCR = ImageReference.parse("ghcr.io/org/app:1")
HUB = ImageReference.parse("alice/private:1")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_creds_come_from_a_file_or_the_environment_never_inline(tmp_path, monkeypatch):
    (tmp_path / "login").write_text("alice:s3cret\n")
    assert logins.load([f"@{tmp_path / 'login'}"], [GHCR], env={}, home=tmp_path).find(GHCR) == "alice:s3cret"
    monkeypatch.setenv("HUBCACHE_TEST_TOKEN", "bob:t")
    assert logins.load(["env:HUBCACHE_TEST_TOKEN"], [GHCR], env={}, home=tmp_path).find(GHCR) == "bob:t"
    with pytest.raises(logins.LoginError, match="not given inline"):
        logins.load(["alice:s3cret"], [GHCR], env={}, home=tmp_path)


def test_bare_creds_with_images_on_several_registries_must_name_one(tmp_path):
    (tmp_path / "login").write_text("alice:s3cret")
    with pytest.raises(logins.LoginError, match="say which one"):
        logins.load([f"@{tmp_path / 'login'}"], [GHCR, HUB], env={}, home=tmp_path)
    found = logins.load([f"ghcr.io=@{tmp_path / 'login'}"], [GHCR, HUB], env={}, home=tmp_path)
    assert found.find(GHCR) == "alice:s3cret" and found.find(HUB) is None


def test_the_engines_logins_are_read_podman_first_then_docker(tmp_path):
    docker = tmp_path / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": b64("alice:hub")}, "ghcr.io": {"auth": b64("d:ghcr")}}}))
    runtime = tmp_path / "run"
    (runtime / "containers").mkdir(parents=True)
    (runtime / "containers" / "auth.json").write_text(json.dumps({"auths": {"ghcr.io": {"auth": b64("p:ghcr")}, "ghcr.io/org": {"auth": b64("p:org")}}}))
    found = logins.load([], [GHCR, HUB], env={"XDG_RUNTIME_DIR": str(runtime)}, home=tmp_path)
    assert found.find(HUB) == "alice:hub", "docker's Docker Hub key is docker.io"
    assert found.find(GHCR) == "p:org", "the longest key covering the repository wins"
    assert found.find(ImageReference.parse("ghcr.io/other/x")) == "p:ghcr", "podman's auth.json before docker's"
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {"ghcr.io": {"auth": b64("given:1")}}}))
    found = logins.load([], [GHCR], authfile, env={"XDG_RUNTIME_DIR": str(runtime)}, home=tmp_path)
    assert found.find(GHCR) == "given:1"


def test_a_credential_helper_is_reported_as_unsupported(tmp_path):
    docker = tmp_path / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {}}, "credsStore": "desktop", "credHelpers": {"ghcr.io": "gh"}}))
    found = logins.load([], [GHCR, HUB], env={}, home=tmp_path)
    assert found.find(HUB) is None
    assert "credsStore 'desktop'" in (found.unsupported(HUB) or "")
    assert "credHelpers 'gh'" in (found.unsupported(GHCR) or "")


class Registry:
    """An opener standing in for a registry (and its token realm) behind the proxy."""

    def __init__(self, challenge: str):
        self.challenge = challenge
        self.opened: list[tuple[str, str | None]] = []

    def open(self, request, timeout=None):
        auth = request.headers.get("Authorization")
        self.opened.append((request.full_url, auth))
        if request.full_url.startswith("https://auth.example/token"):
            return io.BytesIO(b'{"token": "t0k"}')
        if auth in ("Bearer t0k", "Basic " + b64("alice:s3cret")):
            return io.BytesIO(b"blob")
        headers = email.message.Message()
        headers["WWW-Authenticate"] = self.challenge
        raise urllib.error.HTTPError(request.full_url, 401, "Unauthorized", headers, io.BytesIO(b""))


def logged_in(opener) -> RegistryClient:
    c = client(opener)
    c.logins = logins.Logins({"ghcr.io": "alice:s3cret"})
    return c


def test_a_login_goes_to_the_token_realm_only(tmp_path):
    opener = Registry('Bearer realm="https://auth.example/token",service="ghcr.io"')
    with logged_in(opener)._get(GHCR, "/v2/org/app/blobs/sha256:0", {}) as r:
        assert r.read() == b"blob"
    (first, _), (token, token_auth), (again, again_auth) = opener.opened
    assert token.startswith("https://auth.example/token?") and token_auth == "Basic " + b64("alice:s3cret")
    assert again == first and again_auth == "Bearer t0k"


def test_a_login_is_presented_as_basic_when_the_registry_asks_for_basic(tmp_path):
    opener = Registry('Basic realm="ghcr"')
    with logged_in(opener)._get(GHCR, "/v2/org/app/blobs/sha256:0", {}) as r:
        assert r.read() == b"blob"
    assert [auth for _, auth in opener.opened] == [None, "Basic " + b64("alice:s3cret")]


def test_without_a_login_the_token_request_is_anonymous_and_basic_is_refused(tmp_path):
    opener = Registry('Bearer realm="https://auth.example/token",service="ghcr.io"')
    with client(opener)._get(GHCR, "/v2/org/app/blobs/sha256:0", {}):
        pass
    assert opener.opened[1][1] is None
    with pytest.raises(PrefetchError, match=r"no login for ghcr\.io"):
        client(Registry('Basic realm="ghcr"'))._get(GHCR, "/v2/org/app/blobs/sha256:0", {})
