"""Canonicalize, then act (docs/security.md): attacks that hide one request inside another's
target, the way a client of the proxy port could, against upstreams that clean paths the way the
distribution registry does (Debian's docker-registry itself, and the Docker Hub double, which
redirects an unclean path to its cleaned form as the registry's router does). Each attack is
refused with a 400 before anything is asked upstream, and the legitimate pull around it works."""

from __future__ import annotations

import json

import pytest

from support import proxied
from support.clients import skopeo_copy
from support.images import build_image
from support.registry import ALICE, REGISTRY_NAME, private_repository, push

HUB = "registry-1.docker.io"
SECRET = "library/vault"
ACCEPT = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"

# From the end of `/v2/<a>/<b>/<manifests|blobs>/<reference>`, four segments up to /v2/: where a
# registry that cleans the path goes next. Each names the first target to hubcache's old parser.
TRICKS = {
    "#": "#/../../../..",
    "%23": "%23/../../../..",
    "dot segments": "/../../../..",
    "empty segment": "//../../../..",
}


@pytest.fixture(scope="module")
def other_image(registry, tmp_path_factory):
    """A small public image, the one an attacker's hidden request names."""
    image = build_image(tmp_path_factory.mktemp("other"), "1", [20_000], seed="canonical")
    push(registry, "test/other:1", image)
    return push(registry, "library/other:1", image)


@pytest.fixture
def vault(registry, dockerhub, multi_image):
    """A private Docker Hub repository (alice's), holding the two-platform image."""
    with private_repository(registry, dockerhub, SECRET, multi_image) as image:
        yield image


def hub_get(proxy, path: str, repository: str, credentials=None, **options) -> proxied.Answer:
    token = proxied.docker_hub_token(proxy.port, repository, ca=proxy.ca_cert, credentials=credentials)
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    return proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=headers, **options)


def refused_as_unclean(answer: proxied.Answer) -> None:
    assert answer.status == 400, (answer.status, answer.body[:300])
    assert json.loads(answer.body)["errors"][0]["code"] == "NAME_INVALID"


@pytest.mark.parametrize("trick", TRICKS.values(), ids=TRICKS.keys())
def test_a_hidden_public_request_never_reads_a_private_image(hubcache, dockerhub, vault, other_image, trick):
    """Finding 1: a client with a token for a public repository names a cached private digest,
    followed by a path the registry cleans to the public image. hubcache refuses the target."""
    proxy = hubcache()
    amd64 = vault.platform("linux/amd64")
    private = {
        "index": f"/v2/{SECRET}/manifests/{vault.index_digest}",
        "manifest": f"/v2/{SECRET}/manifests/{amd64.manifest.digest}",
        "layer": f"/v2/{SECRET}/blobs/{amd64.layers[0].digest}",
    }
    for what, path in private.items():
        assert hub_get(proxy, path, SECRET, ALICE).status == 200, what  # alice caches it
    public = {
        "index": "/library/other/manifests/1",
        "manifest": "/library/other/manifests/1",
        "layer": f"/library/other/blobs/{other_image.platforms[0].layers[0].digest}",
    }
    dockerhub.reset()
    for what, path in private.items():
        attack = hub_get(proxy, f"{path}{trick}{public[what]}", "library/other", follow=False)
        refused_as_unclean(attack)
    assert [r for r in dockerhub.requests() if r.kind != "token"] == [], "nothing asked of the registry"
    for what, path in private.items():  # the canonical paths: still alice's alone
        assert hub_get(proxy, path, "library/other", follow=False).status in (401, 403, 404), what
        assert hub_get(proxy, path, SECRET, ALICE).status == 200, what


@pytest.mark.parametrize("trick", TRICKS.values(), ids=TRICKS.keys())
def test_a_tag_cannot_be_poisoned_by_a_hidden_request(hubcache, dockerhub, registry, multi_image, other_image, trick, tmp_path):
    """Finding 2: a request for tag 2 of library/multi (which upstream does not have) that the
    registry cleans into library/other:1 never stores library/other's index under library/multi:2,
    neither through Docker Hub nor through a distribution registry reached directly."""
    proxy = hubcache(tag_freshness=3600)
    token = proxied.docker_hub_token(proxy.port, "library/multi", ca=proxy.ca_cert)
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    for host, name in ((HUB, "library"), (REGISTRY_NAME, "test")):
        target = f"/v2/{name}/multi/manifests/2{trick}/{name}/other/manifests/1"
        refused_as_unclean(proxied.request(proxy.port, host, target, ca=proxy.ca_cert, headers=headers, follow=False))
        after = proxied.request(proxy.port, host, f"/v2/{name}/multi/manifests/2", ca=proxy.ca_cert, headers=headers, follow=False)
        assert after.status == 404, (host, after.status, after.body[:200])
    assert not [e for e in proxy.journal() if e.get("reference") == "2" and e["outcome"] == "filled"]
    pulled = skopeo_copy(f"docker://{REGISTRY_NAME}/test/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr


def test_a_hidden_request_cannot_walk_past_the_image_policy(hubcache, dockerhub, multi_image, other_image):
    proxy = hubcache(deny_images=["docker.io/library/other"])
    token = proxied.docker_hub_token(proxy.port, "library/multi", ca=proxy.ca_cert)
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    attack = proxied.request(proxy.port, HUB, f"/v2/library/multi/manifests/1{TRICKS['#']}/library/other/manifests/1", ca=proxy.ca_cert, headers=headers, follow=False)
    refused_as_unclean(attack)
    denied = proxied.request(proxy.port, HUB, "/v2/library/other/manifests/1", ca=proxy.ca_cert, headers=headers, follow=False)
    assert denied.status == 403
    allowed = proxied.request(proxy.port, HUB, "/v2/library/multi/manifests/1", ca=proxy.ca_cert, headers=headers)
    assert allowed.status == 200 and allowed.headers["Docker-Content-Digest"] == multi_image.index_digest
