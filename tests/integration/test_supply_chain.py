"""Supply chain with a real client (skopeo) and the distribution registry: a signature in the tag
schema travels through the cache and resolves offline; deny_images and allow_images refuse what
they name, with the rule in the registry's error. The referrers API is covered in process
(tests/unit/test_cache.py): Debian's registry has none."""

from __future__ import annotations

from support.clients import pull, pulled_blobs, skopeo_copy
from support.images import build_image
from support.registry import REGISTRY_NAME, push


def test_a_signature_tag_is_cached_and_pulls_offline(hubcache, registry, layouts, multi_image, tmp_path):
    # cosign's tag schema: the signature of an image is a tag named after the image's digest.
    sig_tag = "sha256-" + multi_image.index_digest.partition(":")[2] + ".sig"
    signature = build_image(layouts / "signature", "1", [512], seed="signature")
    push(registry, f"test/multi:{sig_tag}", signature)

    proxy = hubcache()
    pull(proxy, f"{REGISTRY_NAME}/test/multi:{sig_tag}", tmp_path / "online")
    proxy.stop()
    registry.stop()  # no upstream at all

    proxy = hubcache(offline=True)
    pull(proxy, f"{REGISTRY_NAME}/test/multi:{sig_tag}", tmp_path / "offline")
    assert pulled_blobs(tmp_path / "offline") == pulled_blobs(tmp_path / "online")


def test_deny_and_allow_images_refuse_with_the_rule_and_let_the_rest_through(hubcache, registry, multi_image, tmp_path):
    proxy = hubcache(deny_images=[f"{REGISTRY_NAME}/test/*"])
    refused = skopeo_copy(f"docker://{REGISTRY_NAME}/test/multi:1", tmp_path / "refused", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert refused.returncode != 0
    assert "denied" in refused.stderr.lower() and f"{REGISTRY_NAME}/test/*" in refused.stderr, refused.stderr
    pull(proxy, f"{REGISTRY_NAME}/library/multi:1", tmp_path / "allowed")
    denied = [e for e in proxy.journal() if e["outcome"] == "denied"]
    assert denied and denied[0]["repository"] == "test/multi"
    registry.settle()
    assert not [r for r in registry.requests() if "/test/multi/" in r.path], "a refused pull never reaches upstream"
    proxy.stop()

    proxy = hubcache(tmp_path / "allowing", allow_images=[f"{REGISTRY_NAME}/library/*"], offline=True)
    refused = skopeo_copy(f"docker://{REGISTRY_NAME}/test/multi:1", tmp_path / "refused-offline", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert refused.returncode != 0 and "allow_images" in refused.stderr, refused.stderr
