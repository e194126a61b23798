"""A private repository on the Docker Hub double: what an authorized client cached never reaches a
client without access, online (checked with upstream) or offline (refused unless told)."""

from __future__ import annotations

import hashlib
import time

import pytest

from support import proxied
from support.clients import skopeo_copy
from support.registry import ALICE, private_repository

HUB = "registry-1.docker.io"
REPO = "library/secret"
ACCEPT = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def secret(registry, dockerhub, multi_image):
    with private_repository(registry, dockerhub, REPO, multi_image) as image:
        yield image


def token(proxy, credentials: tuple[str, str] | None = None) -> dict[str, str]:
    token = proxied.docker_hub_token(proxy.port, REPO, ca=proxy.ca_cert, credentials=credentials)
    return {"Authorization": f"Bearer {token}", "Accept": ACCEPT}


def paths(image) -> dict[str, str]:
    amd64 = image.platform("linux/amd64")
    result = {
        "tag": f"/v2/{REPO}/manifests/1",
        "index": f"/v2/{REPO}/manifests/{image.index_digest}",
        "manifest": f"/v2/{REPO}/manifests/{amd64.manifest.digest}",
    }
    result.update({f"blob {b.digest[7:19]}": f"/v2/{REPO}/blobs/{b.digest}" for b in (amd64.config, *amd64.layers)})
    return result


def get(proxy, path: str, headers: dict[str, str]) -> proxied.Answer:
    return proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=headers)


def pull_as_alice(proxy, image) -> None:
    alice = token(proxy, ("alice", "s3cret"))
    for what, path in paths(image).items():
        answer = get(proxy, path, alice)
        assert answer.status == 200, (what, answer.status, answer.body[:200])
        if what.startswith("blob"):
            assert hashlib.sha256(answer.body).hexdigest() == path.rsplit(":", 1)[1]


@pytest.mark.parametrize("tag_freshness", [0, 3600])
def test_an_anonymous_client_gets_nothing_alice_cached(hubcache, dockerhub, secret, tag_freshness):
    proxy = hubcache(tag_freshness=tag_freshness)
    pull_as_alice(proxy, secret)
    cached = {e["digest"] for e in proxy.journal() if e["outcome"] == "filled"}
    assert secret.platform("linux/amd64").layers[0].digest in cached

    anonymous = token(proxy)
    for what, path in paths(secret).items():
        answer = get(proxy, path, anonymous)
        assert answer.status in (401, 403, 404), (what, answer.status)
        assert answer.json()["errors"], what
        head = proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=anonymous, method="HEAD")
        assert head.status in (401, 403, 404), ("HEAD", what, head.status)
    # Alice still gets everything, from the cache.
    dockerhub.reset()
    pull_as_alice(proxy, secret)
    assert dockerhub.requests(kind="cdn") == []


def test_offline_private_content_is_served_only_under_the_policy(hubcache, secret, tmp_path):
    proxy = hubcache()
    pull_as_alice(proxy, secret)
    proxy.stop()

    proxy = hubcache(offline=True)
    for what, path in paths(secret).items():
        answer = get(proxy, path, {"Accept": ACCEPT})
        assert answer.status == 401, what
        assert "cannot check credentials" in answer.json()["errors"][0]["message"]
    proxy.stop()

    proxy = hubcache(offline=True, offline_private=True)
    for what, path in paths(secret).items():
        assert get(proxy, path, {"Accept": ACCEPT}).status == 200, what


def test_credentials_in_the_registry_settings_let_anonymous_clients_pull(hubcache, dockerhub, secret, tmp_path):
    """`registry_settings` credentials are presented on the token requests of clients that bring
    none; without them, the same anonymous pull is refused."""
    ref = f"docker://{HUB}/{REPO}:1"
    plain = hubcache(tmp_path / "plain")
    refused = skopeo_copy(ref, tmp_path / "refused", proxy=plain.url, ca_bundle=plain.client_bundle)
    assert refused.returncode != 0 and "unauthorized" in refused.stderr.lower(), refused.stderr

    secret_file = tmp_path / "dockerhub.credentials"
    secret_file.write_text("alice:s3cret\n")
    proxy = hubcache(tmp_path / "with-account", registry_settings=[f"{HUB}:credentials=@{secret_file}"])
    pulled = skopeo_copy(ref, tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr
    layers = secret.platform("linux/amd64").layers
    assert {e["digest"] for e in proxy.journal() if e["outcome"] == "filled"} >= {layer.digest for layer in layers}
    assert "s3cret" not in proxy.log_text() and "s3cret" not in (proxy.cache_dir / "misses.jsonl").read_text()


def test_upstreams_yes_is_remembered_for_access_check_seconds_and_asked_again_after(hubcache, dockerhub, secret):
    """Within `access_check_seconds` of upstream's yes to a token, cached content is served to it
    without asking upstream, even once upstream would refuse it; past that, upstream is asked again
    and its no is what the client gets."""
    window = 10
    proxy = hubcache(access_check_seconds=window)
    pull_as_alice(proxy, secret)
    layer = secret.platform("linux/amd64").layers[0]
    path = f"/v2/{REPO}/blobs/{layer.digest}"
    alice = token(proxy, ALICE)
    dockerhub.reset()

    def checks() -> int:
        """The access checks hubcache made upstream: HEADs of the blob with the client's token."""
        return len([r for r in dockerhub.requests(kind="blob", method="HEAD") if r.path == path])

    asked = time.monotonic()
    assert get(proxy, path, alice).status == 200
    granted = time.monotonic()  # upstream's yes came in between
    assert checks() == 1
    assert get(proxy, path, alice).status == 200 and checks() == 1

    bearer = alice["Authorization"].removeprefix("Bearer ")
    dockerhub.revoke(bearer)
    assert not dockerhub.grants(bearer, REPO)
    answer = get(proxy, path, alice)
    # Two requests take far less than the window; past it, this answer would teach nothing.
    assert time.monotonic() < asked + window, "the machine stalled past the window: nothing learnt"
    assert answer.status == 200 and checks() == 1, "upstream's yes was not remembered"

    while time.monotonic() <= granted + window:  # the yes is older than access_check_seconds now
        time.sleep(0.1)
    answer = get(proxy, path, alice)
    assert checks() == 2, "upstream was not asked again"
    assert answer.status == 401 and answer.json()["errors"][0]["code"] == "UNAUTHORIZED"
    # A token upstream accepts is served again, after its own check.
    assert get(proxy, path, token(proxy, ALICE)).status == 200 and checks() == 3
    assert dockerhub.requests(kind="cdn") == [], "every answer came from the cache"
