"""Two independent upstream registries (two real distribution registries, as ghcr.io and quay.io)
cached by one hubcache run, holding one layer in common. A blob cached through one registry is
shared with the other only where that other registry says the client may read it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from support import proxied
from support.clients import pull, pulled_blobs
from support.hubcache import upstream_options
from support.images import ImageInfo, build_image
from support.registry import Registry, push

GHCR, QUAY, HUB = "ghcr.io", "quay.io", "registry-1.docker.io"
SECRET = "library/shared-secret"  # a private Docker Hub repository holding the shared layer


@dataclass
class Upstreams:
    ghcr: Registry
    quay: Registry
    app_a: ImageInfo  # ghcr.io/org/app:1: the shared layer and one of its own
    app_b: ImageInfo  # quay.io/org/app:1: the shared layer and another of its own
    other: ImageInfo  # quay.io/org/other:1: no shared layer

    @property
    def shared(self) -> str:
        return self.app_a.platforms[0].layers[0].digest


@pytest.fixture(scope="module")
def upstreams(ca, tmp_path_factory):
    layouts = tmp_path_factory.mktemp("registries-layouts")
    # The same seed and size give the same first layer; the second layers differ in size.
    app_a = build_image(layouts, "a", [400_000, 200_000], seed="shared")
    app_b = build_image(layouts, "b", [400_000, 250_000], seed="shared")
    other = build_image(layouts, "other", [100_000], seed="other")
    assert app_a.platforms[0].layers[0] == app_b.platforms[0].layers[0]
    assert app_a.platforms[0].layers[1] != app_b.platforms[0].layers[1]
    ghcr = Registry(tmp_path_factory.mktemp("ghcr"), ca, names=(GHCR,)).start()
    quay = Registry(tmp_path_factory.mktemp("quay"), ca, names=(QUAY,)).start()
    try:
        push(ghcr, "org/app:1", app_a)
        push(quay, "org/app:1", app_b)
        push(quay, "org/other:1", other)
        yield Upstreams(ghcr, quay, app_a, app_b, other)
    finally:
        ghcr.stop()
        quay.stop()


@pytest.fixture(autouse=True)
def _fresh_counters(upstreams):
    for reg in (upstreams.ghcr, upstreams.quay):
        reg.start()
        reg.reset_requests()


@pytest.fixture
def proxy(hubcache, registry, dockerhub, upstreams):
    """hubcache caching Docker Hub (the double), ghcr.io and quay.io at once."""
    options = upstream_options(registry, dockerhub)
    return hubcache(
        registries=[*options["registries"], GHCR, QUAY],
        upstream_map=[
            *options["upstream_map"],
            f"{GHCR}=127.0.0.1:{upstreams.ghcr.port}",
            f"{QUAY}=127.0.0.1:{upstreams.quay.port}",
        ],
    )


def blobs_of(image: ImageInfo) -> set[str]:
    p = image.platforms[0]
    return {p.config.digest, *(layer.digest for layer in p.layers)}


def blob(proxy, host: str, repo: str, digest: str, headers: dict[str, str] | None = None) -> proxied.Answer:
    return proxied.request(proxy.port, host, f"/v2/{repo}/blobs/{digest}", ca=proxy.ca_cert, headers=headers)


def requests_for(reg: Registry, digest: str) -> list[tuple[str, str]]:
    reg.settle()
    return [(r.method, r.path.split("?")[0]) for r in reg.requests() if r.reference == digest]


def test_one_run_caches_both_registries(proxy, upstreams, tmp_path):
    ghcr, quay = upstreams.ghcr, upstreams.quay
    pull(proxy, f"{GHCR}/org/app:1", tmp_path / "a-cold")
    pull(proxy, f"{QUAY}/org/app:1", tmp_path / "b-cold")
    assert pulled_blobs(tmp_path / "a-cold") == blobs_of(upstreams.app_a)
    assert pulled_blobs(tmp_path / "b-cold") == blobs_of(upstreams.app_b)
    ghcr.settle()
    quay.settle()
    assert {r.reference for r in ghcr.blob_gets()} == blobs_of(upstreams.app_a)
    # quay.io's copy of the shared layer was not fetched again: quay.io was asked whether this
    # client may read it (a HEAD), and it came from the cache.
    assert {r.reference for r in quay.blob_gets()} == blobs_of(upstreams.app_b) - {upstreams.shared}
    assert requests_for(quay, upstreams.shared) == [("HEAD", f"/v2/org/app/blobs/{upstreams.shared}")]

    ghcr.reset_requests()
    quay.reset_requests()
    pull(proxy, f"{GHCR}/org/app:1", tmp_path / "a-warm")
    pull(proxy, f"{QUAY}/org/app:1", tmp_path / "b-warm")
    assert pulled_blobs(tmp_path / "a-warm") == blobs_of(upstreams.app_a)
    assert pulled_blobs(tmp_path / "b-warm") == blobs_of(upstreams.app_b)
    for reg in (ghcr, quay):
        reg.settle()
        assert reg.blob_gets() == [] and reg.manifest_gets() == []
        assert [(r.method, r.is_manifest) for r in reg.requests() if "/v2/org/" in r.path] == [("HEAD", True)]


def test_a_blob_from_one_registry_is_served_through_another_after_its_head(proxy, upstreams, tmp_path):
    pull(proxy, f"{GHCR}/org/app:1", tmp_path / "a")
    answer = blob(proxy, QUAY, "org/app", upstreams.shared)
    assert answer.status == 200
    assert hashlib.sha256(answer.body).hexdigest() == upstreams.shared.split(":")[1]
    assert requests_for(upstreams.quay, upstreams.shared) == [("HEAD", f"/v2/org/app/blobs/{upstreams.shared}")]


@pytest.mark.parametrize("repo", ["org/other", "org/unknown"])
def test_a_blob_from_one_registry_is_refused_where_the_other_lacks_it(proxy, upstreams, tmp_path, repo):
    pull(proxy, f"{GHCR}/org/app:1", tmp_path / "a")
    if repo == "org/other":  # a repository quay.io serves, and hubcache knows as public
        pull(proxy, f"{QUAY}/org/other:1", tmp_path / "other")
    upstreams.quay.reset_requests()
    answer = blob(proxy, QUAY, repo, upstreams.shared)
    assert answer.status == 404, answer.body[:200]
    assert answer.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert requests_for(upstreams.quay, upstreams.shared) == [("HEAD", f"/v2/{repo}/blobs/{upstreams.shared}")]
    # Nor a manifest of the other registry by its digest.
    manifest = proxied.request(
        proxy.port, QUAY, f"/v2/{repo}/manifests/{upstreams.app_a.platforms[0].manifest.digest}", ca=proxy.ca_cert,
        headers={"Accept": upstreams.app_a.platforms[0].manifest.media_type},
    )
    assert manifest.status == 404, manifest.body[:200]
    assert manifest.json()["errors"]


def test_a_blob_from_one_registry_is_refused_while_the_other_cannot_answer(proxy, upstreams, tmp_path):
    pull(proxy, f"{GHCR}/org/app:1", tmp_path / "a")
    upstreams.quay.stop()
    answer = blob(proxy, QUAY, "org/app", upstreams.shared)
    assert answer.status == 503, answer.body[:200]
    assert answer.json()["errors"][0]["code"] == "UNAVAILABLE"


@pytest.fixture
def secret(registry, dockerhub, upstreams):
    """ghcr.io's image, also in a private Docker Hub repository that only alice may read."""
    push(registry, f"{SECRET}:1", upstreams.app_a)
    dockerhub.private_repos[SECRET] = ("alice", "s3cret")
    yield
    del dockerhub.private_repos[SECRET]


def hub_token(proxy, credentials: tuple[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {proxied.docker_hub_token(proxy.port, SECRET, ca=proxy.ca_cert, credentials=credentials)}"}


def test_a_blob_from_a_public_registry_is_refused_through_a_private_repository(
    proxy, dockerhub, upstreams, secret, tmp_path
):
    pull(proxy, f"{GHCR}/org/app:1", tmp_path / "a")
    dockerhub.reset()
    anonymous = blob(proxy, HUB, SECRET, upstreams.shared, hub_token(proxy))
    assert anonymous.status == 401, anonymous.body[:200]
    assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
    heads = [(r.method, r.status) for r in dockerhub.requests(kind="blob")]
    assert heads == [("HEAD", 401)]

    dockerhub.reset()
    alice = blob(proxy, HUB, SECRET, upstreams.shared, hub_token(proxy, ("alice", "s3cret")))
    assert alice.status == 200
    assert hashlib.sha256(alice.body).hexdigest() == upstreams.shared.split(":")[1]
    assert [(r.method, r.status) for r in dockerhub.requests(kind="blob")] == [("HEAD", 200)]
    assert dockerhub.requests(kind="cdn") == [], "served from the cache"
